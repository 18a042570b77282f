"""Mixture-of-experts layers: stacked experts, gating, balancing, auxiliary losses, statistics.

Modules: ``kernels`` (grouped products, custom operators), ``experts`` (stacked experts),
``routing`` (the gate), ``balancing`` (the paper's constraint), ``layer`` (:class:`MoE`),
``model`` (whole-model helpers). Everything public is importable from here.

One :class:`MoE` layer computes ``z = sum_i g_i(x) f_i(x)`` (Eigen et al. 2013) with either
dense softmax gating (every expert runs, as in the paper) or sparse top-k routing (only the k
best experts run, Shazeer et al. 2017). The layer keeps its auxiliary loss and its usage
statistics on itself; :func:`moe_auxiliary_loss` and :func:`collect_expert_stats` gather them
from any model in one call, so a Brain never needs to know where the MoE layers are.

Padding. Layers take ``(x, lengths=...)`` (SpeechBrain relative lengths) or ``(x, mask=...)``
(bool, True on real frames). Modules that call their feed-forward as ``ffn(x)`` (SpeechBrain's
Conformer and Transformer layers) cannot pass a mask, so the caller gives it to every MoE
layer of the model for the forward pass with the context manager :func:`padding_mask` (what
the package's Brains and exported models do; :func:`set_padding_mask` sets it until cleared). Relative lengths are resolved against each layer's own time axis, so
one call serves layers before and after subsampling. Padding frames get no expert, output
zero, and are left out of every loss and statistic.

Speed. Dense gating runs all experts as one GEMM per projection over the experts' stacked
weights. Top-k routing sorts the (token, expert) pairs by expert once and multiplies each
expert's contiguous slice, with ``torch._grouped_mm`` where it works, else a loop over slices;
rows go back to frame order through the inverse permutation, so neither direction needs a
scatter-add (atomics, or a sort in deterministic mode). Without padding the masking steps are
skipped. On a CPU, large batches run in cache-sized pieces: dense gating in blocks of rows,
top-k routing one expert's whole computation at a time. The router runs in float32 under
autocast: bf16 logits flip near-tied top-k choices.

``torch.compile`` (SpeechBrain's ``--compile``) captures a layer as one graph, dense or
top-k, float32 or bf16, with padding, capacity, statistics and auxiliary losses: on a GPU,
where a layer at speech sizes is bound by launching kernels, that is what lets CUDA graphs
and fused kernels take over. The balancing constraint alone runs outside the graph (one
graph break, no recompilation as its phase advances).
"""

from sb_crossmodal_kd.nnet.moe.balancing import BalancingConstraint
from sb_crossmodal_kd.nnet.moe.experts import EXPERT_TYPES, StackedExperts, swiglu
from sb_crossmodal_kd.nnet.moe.kernels import KERNELS, count_ids, grouped_matmul
from sb_crossmodal_kd.nnet.moe.layer import STAT_NAMES, MoE
from sb_crossmodal_kd.nnet.moe.model import (
    collect_expert_stats,
    expert_counters,
    load_expert_counters,
    moe_auxiliary_loss,
    moe_layers,
    padding_mask,
    reset_expert_stats,
    set_moe_epoch,
    set_padding_mask,
)
from sb_crossmodal_kd.nnet.moe.routing import Router

__all__ = [
    "BalancingConstraint", "EXPERT_TYPES", "KERNELS", "MoE", "Router", "STAT_NAMES",
    "StackedExperts", "collect_expert_stats", "count_ids", "expert_counters", "grouped_matmul",
    "load_expert_counters", "moe_auxiliary_loss", "moe_layers", "padding_mask",
    "reset_expert_stats", "set_moe_epoch", "set_padding_mask", "swiglu",
]
