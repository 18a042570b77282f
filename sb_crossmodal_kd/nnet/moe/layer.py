"""The MoE layer: routing, experts, padding, capacity, auxiliary losses and statistics."""

import math
import warnings

import torch
from torch import nn

from sb_crossmodal_kd.distributed import sum_across_processes
from sb_crossmodal_kd.lengths import lengths_to_mask
from sb_crossmodal_kd.nnet.moe.balancing import BalancingConstraint
from sb_crossmodal_kd.nnet.moe.experts import StackedExperts
from sb_crossmodal_kd.nnet.moe.kernels import KERNELS, _CombineRows, _DispatchRows, count_ids
from sb_crossmodal_kd.nnet.moe.routing import Router

STAT_NAMES = ("gate_mass", "top1_count", "routed_count", "dropped_count", "entropy", "frames")


class MoE(nn.Module):
    """A mixture-of-experts layer, dense (the paper) or sparse top-k, for [B, T, D] inputs.

    Arguments
    ---------
    input_size : int
        Input feature size D.
    num_experts : int
        Number of experts N.
    output_size : int, optional
        Output size O (default D).
    expert : str
        Expert type, see :class:`StackedExperts`: "relu" (paper), "ffn" or "swiglu".
    expert_hidden_size : int, optional
        Inner size of "ffn" and "swiglu" experts.
    activation : type
        Activation class of "relu" and "ffn" experts.
    dropout : float
        Dropout inside the experts.
    top_k : int, optional
        None for dense softmax gating over all experts (every expert runs); k in [1, N] to
        run only the k experts with the highest gates.
    renormalize_top_k : bool, optional
        Whether the k selected gates are renormalised to sum to one (as Mixtral does).
        Default: yes for k >= 2, no for k = 1, where the one gate would always be 1 and the
        router would get no gradient from the task loss (Switch Transformer scales the
        expert's output by its raw probability instead).
    gate_hidden_size : int, optional
        Hidden size of the gating network (None: linear gate).
    noisy_gating : bool
        Learned gate noise in training (Shazeer et al. 2017).
    load_balancing_weight : float
        Weight of the Switch/GShard load-balancing loss ``N * sum_i f_i P_i``.
    z_loss_weight : float
        Weight of the router z-loss ``mean(logsumexp(logits)^2)``.
    capacity_factor : float, optional
        Top-k only: each expert takes at most ``ceil(capacity_factor * k * frames / N)``
        assignments per batch, first choices before second choices; the rest are dropped
        (their contribution is zero, a residual connection around the layer carries them).
    balance_margin : float, optional
        Enables the paper's :class:`BalancingConstraint` with this margin.
    balance_epochs, balance_steps : int, optional
        End of the constraint's phase one, in epochs or training batches.
    balance_chunk_size : int, optional
        Frames the constraint decides together (None: the whole batch; 1: the paper's
        frame-by-frame rule).
    kernel : str
        Top-k expert kernel: "auto" (per expert on a CPU for large batches, else
        ``torch._grouped_mm`` where it works, else "loop"), "grouped_mm", "loop" (each projection over all experts'
        slices) or "per_expert" (each expert's projections on its own slice).
    expert_bias : bool, optional
        Whether the experts have biases (default: True except for "swiglu").
    track_stats : bool
        Whether to accumulate usage statistics (read with :func:`collect_expert_stats`).

    Example
    -------
    >>> moe = MoE(16, num_experts=4, expert="ffn", expert_hidden_size=32, top_k=2,
    ...           load_balancing_weight=0.01)
    >>> x = torch.randn(2, 5, 16)
    >>> y = moe(x, lengths=torch.tensor([1.0, 0.6]))
    >>> y.shape
    torch.Size([2, 5, 16])
    >>> int(torch.count_nonzero(y[1, 3:]))  # padding frames output zero
    0
    >>> from sb_crossmodal_kd.nnet.moe import moe_auxiliary_loss
    >>> moe_auxiliary_loss(moe).shape
    torch.Size([])
    """

    def __init__(
        self,
        input_size,
        num_experts,
        output_size=None,
        expert="relu",
        expert_hidden_size=None,
        activation=nn.ReLU,
        dropout=0.0,
        top_k=None,
        renormalize_top_k=None,
        gate_hidden_size=None,
        noisy_gating=False,
        load_balancing_weight=0.0,
        z_loss_weight=0.0,
        capacity_factor=None,
        balance_margin=None,
        balance_epochs=None,
        balance_steps=None,
        balance_chunk_size=None,
        kernel="auto",
        expert_bias=None,
        track_stats=True,
    ):
        super().__init__()
        if num_experts is None or num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if top_k is not None and not 1 <= top_k <= num_experts:
            raise ValueError(
                f"top_k={top_k} is impossible with num_experts={num_experts}: "
                "use 1 <= top_k <= num_experts, or top_k=None for dense gating"
            )
        if capacity_factor is not None:
            if top_k is None:
                raise ValueError("capacity_factor needs top_k routing (dense gating has no capacity)")
            if capacity_factor <= 0:
                raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
        for name, value in (("load_balancing_weight", load_balancing_weight),
                            ("z_loss_weight", z_loss_weight)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if balance_margin is None and any(
            v is not None for v in (balance_epochs, balance_steps, balance_chunk_size)
        ):
            raise ValueError(
                "balance_epochs/balance_steps/balance_chunk_size given without balance_margin"
            )
        if kernel not in KERNELS:
            raise ValueError(f"kernel={kernel!r} is not one of {KERNELS}")
        output_size = input_size if output_size is None else output_size
        self.input_size = input_size
        self.output_size = output_size
        self.num_experts = num_experts
        self.top_k = top_k
        if renormalize_top_k is None:
            renormalize_top_k = top_k is not None and top_k > 1
        self.renormalize_top_k = renormalize_top_k
        self.capacity_factor = capacity_factor
        self.load_balancing_weight = load_balancing_weight
        self.z_loss_weight = z_loss_weight
        self.kernel = kernel
        self.track_stats = track_stats

        self.router = Router(input_size, num_experts, gate_hidden_size, noisy_gating)
        self.experts = StackedExperts(
            num_experts, input_size, output_size, expert, expert_hidden_size, activation,
            dropout, expert_bias,
        )
        self.constraint = None
        if balance_margin is not None:
            self.constraint = BalancingConstraint(
                num_experts, balance_margin, balance_epochs, balance_steps, balance_chunk_size
            )

        # Set by the latest forward pass; read (and cleared) by the collectors below.
        self.aux_loss = None
        self.last_assignment = None  # [B, T] argmax expert, -1 on padding
        self.padding_context = None  # (kind, tensor) set by set_padding_mask
        # Usage counters are plain tensors, not buffers: DDP copies every buffer from rank 0
        # into the other ranks before each forward pass, which would overwrite their counts
        # (each rank counts its own frames; the counts are summed when read).
        for name in STAT_NAMES:
            shape = () if name in ("entropy", "frames") else (num_experts,)
            setattr(self, f"stat_{name}", torch.zeros(shape))

    # -- padding ---------------------------------------------------------------------------

    def _resolve_mask(self, x, lengths, mask):
        batch, time = x.shape[0], x.shape[1]
        if mask is None and lengths is None and self.padding_context is not None:
            kind, value = self.padding_context
            if kind == "mask":
                mask = value
            else:
                lengths = value
        if mask is not None:
            if mask.shape != (batch, time):
                raise ValueError(
                    f"padding mask of shape {tuple(mask.shape)} does not match input "
                    f"[batch={batch}, time={time}]; pass relative lengths to set_padding_mask "
                    "when the layer runs at another frame rate"
                )
            return mask.to(device=x.device, dtype=torch.bool)
        if lengths is not None:
            if lengths.shape != (batch,):
                raise ValueError(
                    f"lengths of shape {tuple(lengths.shape)} do not match batch size {batch}"
                )
            return lengths_to_mask(lengths.to(x.device), time)
        return None

    # -- routing ---------------------------------------------------------------------------

    def route(self, x, valid):
        """Gate values of the valid frames.

        Arguments
        ---------
        x : torch.Tensor
            [M, D] frames.
        valid : torch.Tensor or None
            [M] bool; None when every frame is real.

        Returns
        -------
        logits : torch.Tensor
            [M, N] router logits (float32).
        probs : torch.Tensor
            [M, N] gate distribution after the balancing constraint.
        top_w, top_i : torch.Tensor or None
            [M, k] gates (renormalised: see ``renormalize_top_k``) and indices of the
            selected experts (top-k only).
        """
        logits = self.router(x)
        probs = torch.softmax(logits, dim=-1)
        if self.constraint is not None:
            # The totals count the gates actually used: top-k records after selection.
            select = None if self.top_k is None else self._sparse_gates
            probs = self.constraint(probs, valid, select)
        if self.top_k is None:
            return logits, probs, None, None
        if self.constraint is None and self.renormalize_top_k:
            # p_i / sum_k p_j = softmax over the k selected logits: the same gates in 2
            # forward and 3 backward operations instead of 3 and 10 (launches are what a
            # GPU step at speech sizes waits for)
            top_logits, top_i = logits.topk(self.top_k, dim=-1)
            return logits, probs, torch.softmax(top_logits, dim=-1), top_i
        top_w, top_i = self._top_k(probs)
        return logits, probs, top_w, top_i

    def _top_k(self, probs):
        top_w, top_i = probs.topk(self.top_k, dim=-1)
        if not self.renormalize_top_k:
            return top_w, top_i
        # the k largest of N probabilities summing to one sum to >= k / N: no division by 0
        return top_w / top_w.sum(-1, keepdim=True), top_i

    def _sparse_gates(self, probs):
        """Dense [M, N] view of the selected top-k gates."""
        top_w, top_i = self._top_k(probs)
        return torch.zeros_like(probs).scatter(1, top_i, top_w)

    # -- forward ---------------------------------------------------------------------------

    def forward(self, x, lengths=None, mask=None):
        """Mixes the experts' outputs frame by frame.

        Arguments
        ---------
        x : torch.Tensor
            [B, T, D] input.
        lengths : torch.Tensor, optional
            [B] SpeechBrain relative lengths.
        mask : torch.Tensor, optional
            [B, T] bool, True on real frames. Without lengths or mask, the layer uses what
            :func:`set_padding_mask` set, else treats every frame as real.

        Returns
        -------
        torch.Tensor
            [B, T, O], zero on padding frames.
        """
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            raise ValueError(
                f"MoE expects [batch, time, input_size={self.input_size}], got {tuple(x.shape)}"
            )
        batch, time, _ = x.shape
        mask = self._resolve_mask(x, lengths, mask)
        flat = x.reshape(batch * time, self.input_size)
        # Without padding every frame is real: the masking steps are skipped altogether.
        valid = None if mask is None else mask.reshape(-1)

        logits, probs, top_w, top_i = self.route(flat, valid)
        routed = dropped = None
        if self.top_k is None:
            gates = probs if valid is None else probs * valid.unsqueeze(-1)
            out = self.experts.forward_dense(flat, gates)
        else:
            out, routed, dropped = self._sparse(flat, valid, top_w, top_i)

        need_assignment = self.track_stats or self.load_balancing_weight > 0
        assignment = None
        if need_assignment:
            assignment = probs.argmax(-1) if self.top_k is None else top_i[:, 0]
            if valid is not None:
                assignment = torch.where(valid, assignment, -1)
        # (eager only: the check would add a guard and a recompile under torch.compile)
        if (not torch.compiler.is_compiling() and self.aux_loss is not None and self.training
                and torch.is_grad_enabled()):
            _warn_uncollected(self)
        self.aux_loss = self._aux_loss(logits, probs, valid, routed, assignment)
        self.last_assignment = None
        if self.track_stats:
            self.last_assignment = assignment.view(batch, time).detach()
            if self.top_k is not None:  # unmasked: _accumulate weighs frames by validity
                gates = torch.zeros_like(probs).scatter(1, top_i, top_w.to(probs.dtype))
            self._accumulate(probs, gates, valid, assignment, routed, dropped)
        return out.view(batch, time, self.output_size)

    def _sparse(self, flat, valid, top_w, top_i):
        """Top-k dispatch: sort the (frame, expert) pairs by expert once, run each expert on
        its contiguous slice, put the rows back with the inverse permutation.

        Returns the output [M, O], the assignments per expert [N] and the dropped
        assignments per expert [N] (None without capacity).
        """
        n, k = self.num_experts, self.top_k
        m = flat.shape[0]
        # Pairs in frame-major order, pair p = (frame p // k, its choice p % k): a view of
        # top_i, and the gate weights' own layout, so no transposed copies either way.
        if valid is not None:  # padding pairs go to the sentinel expert n: sorted last
            top_i = torch.where(valid.unsqueeze(-1), top_i, n)
        expert_ids = top_i.reshape(-1)
        dropped = None
        if self.capacity_factor is not None:
            # places are taken in choice-major order: first choices before second choices
            by_choice = top_i.t().reshape(-1)
            # == arange, not F.one_hot: that checks the ids' range on the host outside CUDA
            one_hot = by_choice.unsqueeze(-1) == torch.arange(n + 1, device=by_choice.device)
            position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1
            if valid is None:
                capacity = math.ceil(self.capacity_factor * k * m / n)
            else:  # stays on the device: no sync for the count of real frames
                capacity = torch.ceil(self.capacity_factor * k * valid.sum() / n)
            over = ((position >= capacity) & (by_choice < n)).view(k, m).t().reshape(-1)
            dropped = count_ids(torch.where(over, expert_ids, n), n)
            expert_ids = torch.where(over, n, expert_ids)

        sorted_ids, perm = torch.sort(expert_ids, stable=True)
        # offsets[i] = number of pairs with expert <= i (the sentinel n is past the last)
        boundaries = torch.arange(1, n + 1, device=flat.device, dtype=sorted_ids.dtype)
        offsets = torch.searchsorted(sorted_ids, boundaries, out_int32=True)
        inverse = torch.empty_like(perm).scatter_(
            0, perm, torch.arange(perm.numel(), device=perm.device)
        )
        # Rows past offsets[-1] (padding, dropped) are not computed by the experts.
        partial = valid is not None or self.capacity_factor is not None
        skip = (sorted_ids == n).unsqueeze(-1) if partial else None
        xs = _DispatchRows.apply(flat, perm, inverse, skip)
        ys = self.experts.forward_grouped(xs, sorted_ids, offsets, self.kernel, skip=skip)
        out = _CombineRows.apply(ys, top_w.to(ys.dtype), perm, inverse, skip)
        routed = None
        if self.track_stats or self.load_balancing_weight > 0:
            routed = torch.cat([offsets[:1], offsets.diff()])  # int32 counts per expert
        return out, routed, dropped

    def _aux_loss(self, logits, probs, valid, routed, assignment):
        """Weighted load-balancing loss plus router z-loss, over valid frames only."""
        if self.load_balancing_weight == 0 and self.z_loss_weight == 0:
            return None
        if valid is None:
            def frame_mean(values):  # [M, ...] -> mean over frames
                return values.mean(0)
        else:
            validf = valid.to(logits.dtype)
            n_valid = validf.sum().clamp_min(1.0)

            def frame_mean(values):
                return (validf @ values) / n_valid
        loss = None
        if self.load_balancing_weight > 0:
            if routed is None:  # dense gating: fraction of frames whose argmax is expert i
                routed = count_ids(assignment, self.num_experts)  # -1 (padding) not counted
            fraction = (routed / routed.sum().clamp_min(1)).to(probs.dtype)
            loss = self.load_balancing_weight * self.num_experts * (fraction @ frame_mean(probs))
        if self.z_loss_weight > 0:
            z_loss = self.z_loss_weight * frame_mean(torch.logsumexp(logits, dim=-1).pow(2))
            loss = z_loss if loss is None else loss + z_loss
        return loss

    @torch.no_grad()
    def _accumulate(self, probs, gates, valid, assignment, routed, dropped):
        """Adds a batch to the usage counters. Written for few operations: on a GPU each is a
        kernel launch, and statistics are on by default in every training step."""
        if self.stat_frames.device != probs.device:  # the model moved since the last count
            for name in STAT_NAMES:
                setattr(self, f"stat_{name}", getattr(self, f"stat_{name}").to(probs.device))
        entropy = torch.special.entr(probs).sum(-1)  # [M], nats; 0 log 0 = 0
        if valid is None:
            self.stat_gate_mass += gates.sum(0)
            self.stat_entropy += entropy.sum()
            self.stat_frames += probs.shape[0]
        else:  # padding rows weigh 0 (dense gates are already zero there, top-k ones not)
            validf = valid.to(probs.dtype)
            self.stat_gate_mass += validf @ gates.to(probs.dtype)
            self.stat_entropy += validf @ entropy
            self.stat_frames += validf.sum()
        self.stat_top1_count += count_ids(assignment, self.num_experts)  # -1 skipped
        if routed is not None:
            self.stat_routed_count += routed
        if dropped is not None:
            self.stat_dropped_count += dropped

    def reset_stats(self):
        """Zeroes the accumulated statistics."""
        for name in STAT_NAMES:
            getattr(self, f"stat_{name}").zero_()

    def stats(self, across_processes=True):
        """Accumulated statistics as plain Python numbers (one device sync).

        Arguments
        ---------
        across_processes : bool
            Under DDP, sum the counters of all processes first (a collective: every rank
            must call it), so that every rank reports the statistics of all the data. Give
            False for data every process saw in full (SpeechBrain's valid and test stages).

        Returns
        -------
        dict
            ``frames``: valid frames seen; ``usage``: mean gate mass per expert (sums to 1);
            ``top1_usage``: fraction of frames whose best expert is i; ``routed_fraction``
            (top-k): fraction of assignments per expert; ``dropped_fraction`` (capacity):
            fraction of assignments dropped; ``gate_entropy``: mean entropy of the gate
            distribution in nats; ``max_entropy``: log N.
        """
        counters = [self.stat_gate_mass, self.stat_top1_count, self.stat_routed_count,
                    self.stat_dropped_count, self.stat_entropy, self.stat_frames]
        if across_processes:
            counters = sum_across_processes(counters)
        gate_mass, top1_count, routed_count, dropped_count, entropy, frames = counters
        frames = float(frames)
        denom = max(frames, 1.0)
        result = {
            "frames": frames,
            "usage": (gate_mass / denom).tolist(),
            "top1_usage": (top1_count / denom).tolist(),
            "gate_entropy": float(entropy) / denom,
            "max_entropy": math.log(self.num_experts),
        }
        if self.top_k is not None:
            assigned = routed_count + dropped_count
            total = max(float(assigned.sum()), 1.0)
            result["routed_fraction"] = (routed_count / total).tolist()
            if self.capacity_factor is not None:
                result["dropped_fraction"] = float(dropped_count.sum()) / total
        return result

    def extra_repr(self):
        routing = "dense" if self.top_k is None else f"top_k={self.top_k}"
        return f"{routing}, capacity_factor={self.capacity_factor}, kernel={self.kernel!r}"


def _warn_uncollected(layer):
    """Once per layer: its previous training pass's auxiliary loss was never collected."""
    if getattr(layer, "_warned_uncollected", False):
        return
    layer._warned_uncollected = True
    warnings.warn(
        "An MoE layer trained a second step without its load-balancing / z-loss being "
        "collected, so nothing keeps its experts balanced: add "
        "sb_crossmodal_kd.nnet.moe.moe_auxiliary_loss(model) to the loss after each forward "
        "pass (a Brain with sb_crossmodal_kd.moe_brain.MoEMixin does), or set load_balancing_weight and "
        "z_loss_weight to 0 if that is intended.",
        stacklevel=3,
    )
