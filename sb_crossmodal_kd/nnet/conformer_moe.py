"""MoE feed-forward modules inside SpeechBrain's Conformer and Transformer encoders.

:func:`use_moe_ffn` swaps the position-wise feed-forward modules of an already built
SpeechBrain encoder for :class:`~sb_crossmodal_kd.nnet.moe.MoE` layers of the same sizes
(WeNet U2++ MoE style), in every layer or every k-th, without touching SpeechBrain's code.
From hparams::

    encoder: !apply:sb_crossmodal_kd.nnet.conformer_moe.use_moe_ffn
        encoder: !new:speechbrain.lobes.models.transformer.Conformer.ConformerEncoder
            num_layers: 12
            d_model: 256
            ...
        num_experts: 8
        top_k: 2
        every: 2

Padding. SpeechBrain's layers call their FFN as ``ffn(x)``, without a padding mask. The
swap therefore also hooks the encoder (``ConformerEncoder`` / ``TransformerEncoder``): when
it is called with ``src_key_padding_mask``, its MoE layers get that mask for the duration of
the call. An encoder called without one uses what the caller gave its MoE layers
(:func:`~sb_crossmodal_kd.nnet.moe.padding_mask`: a Brain with
:class:`~sb_crossmodal_kd.moe_brain.MoEMixin` gives the batch's relative lengths), else
treats all frames as real. The Brain adds
:func:`~sb_crossmodal_kd.nnet.moe.moe_auxiliary_loss` to its objective.

Upcycling a pretrained dense model. The swap happens when the hparams are built, before
SpeechBrain's ``Pretrainer`` (or ``Checkpointer``) loads anything; so each MoE layer made
here also loads the state dict of the dense FFN it replaced (``...ffn.0.weight``, ...): every
expert takes the dense weights, the router keeps its own initial ones. A checkpoint of the
dense model therefore loads into the MoE model unchanged, and the MoE starts out computing
what the dense model did.
"""

import logging

import torch
from speechbrain.lobes.models.transformer.Conformer import (
    ConformerEncoder,
    ConformerEncoderLayer,
)
from speechbrain.lobes.models.transformer.Transformer import (
    TransformerEncoder,
    TransformerEncoderLayer,
)
from speechbrain.nnet.attention import PositionalwiseFeedForward

from sb_crossmodal_kd.nnet.moe import MoE, moe_layers, set_padding_mask

logger = logging.getLogger(__name__)

_HOOKED = "_moe_padding_hooks"


def _padding_pre_hook(module, args, kwargs):
    """Gives the encoder's MoE layers its key padding mask (True on padding) for this call."""
    pad = kwargs.get("src_key_padding_mask")
    if pad is None and len(args) > 2:  # forward(src, src_mask, src_key_padding_mask, ...)
        pad = args[2]
    module._moe_mask_set = pad is not None
    if pad is not None:
        set_padding_mask(module, mask=~pad.bool())


def _padding_post_hook(module, args, kwargs, output):
    """Clears the mask the pre-hook set, so a later call cannot see a stale one."""
    if getattr(module, "_moe_mask_set", False):
        set_padding_mask(module)
        module._moe_mask_set = False


def _hook_padding(encoder):
    for module in encoder.modules():
        if isinstance(module, ConformerEncoder | TransformerEncoder) and not hasattr(
            module, _HOOKED
        ) and moe_layers(module):
            setattr(module, _HOOKED, (
                module.register_forward_pre_hook(_padding_pre_hook, with_kwargs=True),
                module.register_forward_hook(_padding_post_hook, with_kwargs=True),
            ))

CONFORMER_FFNS = ("both", "first", "second")


# A dense PositionalwiseFeedForward's parameters (Sequential(Linear, activation, Dropout,
# Linear)) and the stacked-expert parameter each becomes: (name, transposed).
_DENSE_FFN_PARAMETERS = {"ffn.0.weight": ("w_in", True), "ffn.0.bias": ("b_in", False),
                         "ffn.3.weight": ("w_out", True), "ffn.3.bias": ("b_out", False)}


def _load_dense_ffn(moe, state_dict, prefix, *_):
    """Load-state-dict pre-hook of an MoE made by :func:`moe_from_ffn`: a state dict of the
    dense FFN it replaced is turned into the MoE's own (the dense weights in every expert;
    every other entry, e.g. the router, keeps the MoE's current value)."""
    if not all(prefix + name in state_dict for name in _DENSE_FFN_PARAMETERS):
        return
    for name, (target, transposed) in _DENSE_FFN_PARAMETERS.items():
        value = state_dict.pop(prefix + name)
        value = value.t() if transposed else value
        state_dict[f"{prefix}experts.{target}"] = value.unsqueeze(0).expand(
            moe.num_experts, *value.shape).clone()
    for name, value in moe.state_dict().items():
        state_dict.setdefault(prefix + name, value.detach().clone())


def moe_from_ffn(ffn, num_experts, top_k=2, init_from_dense=True, **moe_kwargs):
    """An MoE layer shaped like a SpeechBrain ``PositionalwiseFeedForward``.

    Each expert is a copy of the dense FFN's architecture (same sizes, activation and
    dropout). With ``init_from_dense`` every expert starts as a copy of the dense weights
    ("upcycling"): since the gates sum to one, the MoE then computes exactly what the dense
    FFN did, and training from a pretrained dense model starts where it was. The MoE also
    loads a state dict of the dense FFN (module docstring: upcycling through ``Pretrainer``).

    Arguments
    ---------
    ffn : speechbrain.nnet.attention.PositionalwiseFeedForward
        The dense module.
    num_experts : int
        Number of experts.
    top_k : int, optional
        Experts per frame (None: dense softmax gating over all experts).
    init_from_dense : bool
        Copy the dense weights into every expert.
    **moe_kwargs
        Further :class:`~sb_crossmodal_kd.nnet.moe.MoE` settings.

    Returns
    -------
    MoE

    Example
    -------
    >>> dense = PositionalwiseFeedForward(32, input_size=16)
    >>> moe = moe_from_ffn(dense, num_experts=4, top_k=2)
    >>> x = torch.randn(2, 5, 16)
    >>> torch.allclose(moe(x), dense(x), atol=1e-5)
    True
    >>> fresh = moe_from_ffn(PositionalwiseFeedForward(32, input_size=16), 4,
    ...                      init_from_dense=False)
    >>> _ = fresh.load_state_dict(dense.state_dict())  # a dense checkpoint, upcycled
    >>> torch.allclose(fresh(x), dense(x), atol=1e-5)
    True
    """
    first, act, drop, second = ffn.ffn[0], ffn.ffn[1], ffn.ffn[2], ffn.ffn[3]
    moe = MoE(
        first.in_features,
        num_experts,
        output_size=second.out_features,
        expert="ffn",
        expert_hidden_size=first.out_features,
        activation=type(act),
        dropout=drop.p,
        top_k=top_k,
        **moe_kwargs,
    )
    if init_from_dense:
        experts = moe.experts
        with torch.no_grad():
            experts.w_in.copy_(first.weight.t().unsqueeze(0).expand_as(experts.w_in))
            experts.w_out.copy_(second.weight.t().unsqueeze(0).expand_as(experts.w_out))
            experts.b_in.copy_(first.bias.unsqueeze(0).expand_as(experts.b_in))
            experts.b_out.copy_(second.bias.unsqueeze(0).expand_as(experts.b_out))
    moe.register_load_state_dict_pre_hook(_load_dense_ffn)
    return moe.to(device=first.weight.device, dtype=first.weight.dtype)


def _selected(index, every, layers):
    if layers is not None:
        return index in layers
    return (index + 1) % every == 0


def use_moe_ffn(
    encoder,
    num_experts=8,
    top_k=2,
    every=1,
    layers=None,
    conformer_ffn="both",
    init_from_dense=True,
    **moe_kwargs,
):
    """Replaces the FFN modules of a SpeechBrain encoder's layers with MoE layers, in place.

    Arguments
    ---------
    encoder : torch.nn.Module
        A built SpeechBrain ``ConformerEncoder`` or ``TransformerEncoder`` (or any module
        holding their layers, e.g. a ``TransformerASR``).
    num_experts : int
        Experts per MoE layer.
    top_k : int, optional
        Experts per frame (None: dense softmax gating).
    every : int
        Use MoE in every k-th encoder layer: layers k-1, 2k-1, ... (0-based); 1 = all.
    layers : list of int, optional
        Explicit 0-based layer indices (overrides ``every``).
    conformer_ffn : str
        Which of a Conformer layer's two macaron FFNs to replace: "both", "first", "second".
    init_from_dense : bool
        Start every expert from the dense FFN's weights (see :func:`moe_from_ffn`).
    **moe_kwargs
        Further :class:`~sb_crossmodal_kd.nnet.moe.MoE` settings (load_balancing_weight,
        z_loss_weight, capacity_factor, noisy_gating, kernel, balance_margin, ...).

    Returns
    -------
    torch.nn.Module
        ``encoder`` itself, so the function can be used with ``!apply:`` in hparams.

    Example
    -------
    >>> from speechbrain.lobes.models.transformer.Conformer import ConformerEncoder
    >>> encoder = ConformerEncoder(num_layers=2, d_model=16, d_ffn=32, nhead=2,
    ...                            kernel_size=3, attention_type="regularMHA")
    >>> encoder = use_moe_ffn(encoder, num_experts=4, top_k=2, every=2)
    >>> from sb_crossmodal_kd.nnet.moe import moe_layers
    >>> [name for name, _ in moe_layers(encoder)]
    ['layers.1.ffn_module1.1', 'layers.1.ffn_module2.1']
    """
    if every is None or every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    if conformer_ffn not in CONFORMER_FFNS:
        raise ValueError(f"conformer_ffn={conformer_ffn!r} is not one of {CONFORMER_FFNS}")
    if layers is not None:
        layers = set(layers)

    def make(ffn):
        return moe_from_ffn(ffn, num_experts, top_k, init_from_dense, **moe_kwargs)

    encoder_layers = [
        m for m in encoder.modules()
        if isinstance(m, ConformerEncoderLayer | TransformerEncoderLayer)
    ]
    if not encoder_layers:
        raise ValueError(
            f"{type(encoder).__name__} holds no SpeechBrain ConformerEncoderLayer or "
            "TransformerEncoderLayer whose FFN could become an MoE"
        )
    if layers is not None and max(layers) >= len(encoder_layers):
        raise ValueError(
            f"layers={sorted(layers)} but the encoder has {len(encoder_layers)} layers"
        )
    for index, layer in enumerate(encoder_layers):
        if not _selected(index, every, layers):
            continue
        if isinstance(layer, ConformerEncoderLayer):
            names = {"both": ("ffn_module1", "ffn_module2"), "first": ("ffn_module1",),
                     "second": ("ffn_module2",)}[conformer_ffn]
            for name in names:
                block = getattr(layer, name)  # Sequential(LayerNorm, FFN, Dropout)
                if not isinstance(block[1], PositionalwiseFeedForward):
                    raise ValueError(f"layer {index}: {name}[1] is {type(block[1]).__name__}, "
                                     "not a PositionalwiseFeedForward")
                block[1] = make(block[1])
        else:
            if not isinstance(layer.pos_ffn, PositionalwiseFeedForward):
                raise ValueError(
                    f"layer {index}: pos_ffn is {type(layer.pos_ffn).__name__} "
                    f"(ffn_type={getattr(layer, 'pos_ffn_type', '?')!r}); only the "
                    "'regularFFN' PositionalwiseFeedForward can become an MoE"
                )
            layer.pos_ffn = make(layer.pos_ffn)
    if not any(moe_kwargs.get(name) for name in
               ("load_balancing_weight", "z_loss_weight", "balance_margin")):
        logger.warning("use_moe_ffn: no load_balancing_weight, z_loss_weight or "
                       "balance_margin, so nothing keeps the experts in use (e.g. "
                       "load_balancing_weight: 0.01, z_loss_weight: 0.001)")
    _hook_padding(encoder)
    return encoder


def use_moe_ffn_settings(encoder, settings, enabled=True, **overrides):
    """:func:`use_moe_ffn` with its arguments from a mapping, e.g. the ``ffn`` block of the
    shared ``hparams/moe.yaml`` fragment; ``overrides`` win over ``settings``. With
    ``enabled=False`` the encoder is returned unchanged (dense), so one hparams file serves
    both variants of an experiment.

    Example
    -------
    >>> from speechbrain.lobes.models.transformer.Transformer import TransformerEncoder
    >>> encoder = TransformerEncoder(num_layers=2, nhead=2, d_ffn=32, d_model=16)
    >>> encoder = use_moe_ffn_settings(encoder, {"num_experts": 4, "top_k": 2}, every=2)
    >>> len(moe_layers(encoder))
    1
    >>> dense = TransformerEncoder(num_layers=2, nhead=2, d_ffn=32, d_model=16)
    >>> len(moe_layers(use_moe_ffn_settings(dense, {"num_experts": 4}, enabled=False)))
    0
    """
    if not enabled:
        return encoder
    return use_moe_ffn(encoder, **{**dict(settings), **overrides})
