"""Whole-model helpers: find every MoE layer of a model and gather, set or reset what the
layers keep (auxiliary losses, usage statistics, padding, the balancing epoch), so a Brain
never needs to know where the layers are."""

from contextlib import contextmanager

import torch
from torch import nn

from sb_crossmodal_kd.nnet.moe.layer import STAT_NAMES, MoE


def _wrapped_child_name(module):
    """Name of the child a wrapper holds the real module in: ``module`` for DDP and
    DataParallel, ``_orig_mod`` for torch.compile's (SpeechBrain's ``--compile``); else None."""
    if isinstance(module, nn.parallel.DistributedDataParallel | nn.DataParallel):
        return "module"
    if "_orig_mod" in module._modules:
        return "_orig_mod"
    return None


def moe_layers(model):
    """All :class:`MoE` layers of ``model`` as (qualified name, layer), in module order.

    Names are as without DDP or ``torch.compile`` (whose wrappers add a ``module`` or
    ``_orig_mod`` level), so logs and statistics read the same however the model runs.

    Example
    -------
    >>> model = nn.Sequential(MoE(4, 2), nn.ReLU(), MoE(4, 2))
    >>> [name for name, _ in moe_layers(model)]
    ['0', '2']
    >>> [name for name, _ in moe_layers(nn.ModuleDict({"m": nn.DataParallel(model)}))]
    ['m.0', 'm.2']
    >>> [name for name, _ in moe_layers(torch.compile(model))]
    ['0', '2']
    """
    # Called every training step (padding masks, auxiliary losses, usage tracking): a walk
    # that skips leaves and the layers' insides, and names only what it may return.
    found, seen, stack = [], set(), [("", model)]
    while stack:  # depth first, pre-order, each module once: the order of named_modules()
        prefix, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        if isinstance(module, MoE):
            found.append((prefix, module))
            continue
        wrapped = _wrapped_child_name(module)
        for name, child in reversed(module._modules.items()):
            if child is None or not (child._modules or isinstance(child, MoE)):
                continue
            stack.append((prefix if name == wrapped else f"{prefix}.{name}" if prefix else name,
                          child))
    return found


def moe_auxiliary_loss(model):
    """Sum of the auxiliary losses of every MoE layer's latest forward pass; clears them.

    A Brain adds this to its objective without knowing the architecture. A layer called
    several times before one collection contributes its latest call only.

    Returns
    -------
    torch.Tensor
        Scalar (zero when no layer has a loss to give).

    Example
    -------
    >>> model = nn.Sequential(MoE(4, 2, z_loss_weight=1e-3), MoE(4, 2, z_loss_weight=1e-3))
    >>> _ = model(torch.randn(1, 3, 4))
    >>> bool(moe_auxiliary_loss(model) > 0), float(moe_auxiliary_loss(model))
    (True, 0.0)
    """
    total = None
    for _, layer in moe_layers(model):
        if layer.aux_loss is not None:
            total = layer.aux_loss if total is None else total + layer.aux_loss
            layer.aux_loss = None
    if total is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        total = torch.zeros((), device=device)
    return total


def collect_expert_stats(model, reset=False, across_processes=True):
    """Usage statistics of every MoE layer, keyed by layer name (see :meth:`MoE.stats`).

    Under DDP (with ``across_processes``) the counters of all processes are summed: a
    collective that every rank must call.

    Example
    -------
    >>> model = nn.Sequential(MoE(4, 2))
    >>> _ = model(torch.randn(2, 3, 4))
    >>> stats = collect_expert_stats(model, reset=True)
    >>> stats["0"]["frames"], round(sum(stats["0"]["usage"]), 4)
    (6.0, 1.0)
    >>> collect_expert_stats(model)["0"]["frames"]
    0.0
    """
    stats = {}
    for name, layer in moe_layers(model):
        stats[name or "moe"] = layer.stats(across_processes)
        if reset:
            layer.reset_stats()
    return stats


def expert_counters(model):
    """CPU copies of every MoE layer's usage counters, by layer name (e.g. for a mid-epoch
    checkpoint; the counters are not in ``state_dict``).

    Example
    -------
    >>> model = nn.Sequential(MoE(4, 2))
    >>> _ = model(torch.randn(2, 3, 4))
    >>> saved = expert_counters(model)
    >>> reset_expert_stats(model)
    >>> load_expert_counters(model, saved)
    >>> collect_expert_stats(model)["0"]["frames"]
    6.0
    """
    return {
        name or "moe": {n: getattr(layer, f"stat_{n}").detach().cpu().clone() for n in STAT_NAMES}
        for name, layer in moe_layers(model)
    }


def load_expert_counters(model, counters):
    """Puts back the counters :func:`expert_counters` returned."""
    for name, layer in moe_layers(model):
        device = next(layer.parameters()).device
        for n in STAT_NAMES:
            setattr(layer, f"stat_{n}", counters[name or "moe"][n].to(device))


def reset_expert_stats(model):
    """Zeroes the statistics of every MoE layer of ``model``."""
    for _, layer in moe_layers(model):
        layer.reset_stats()


def set_padding_mask(model, mask=None, lengths=None):
    """Tells every MoE layer of ``model`` which frames of the next batch are padding.

    For modules that call their MoE feed-forward without a mask (SpeechBrain's Conformer and
    Transformer layers). Give relative ``lengths`` [B] when the layers run at another frame
    rate than the caller (each layer scales them to its own time axis), or a bool ``mask``
    [B, T] (True on real frames) at the layers' frame rate. Call with neither to clear.

    Example
    -------
    >>> model = nn.Sequential(MoE(4, 2))
    >>> set_padding_mask(model, lengths=torch.tensor([1.0, 0.5]))
    >>> y = model(torch.randn(2, 4, 4))
    >>> int(torch.count_nonzero(y[1, 2:]))
    0
    >>> set_padding_mask(model)  # clear
    """
    _set_padding(moe_layers(model), mask, lengths)


def _set_padding(layers, mask=None, lengths=None):
    if mask is not None and lengths is not None:
        raise ValueError("give either mask or lengths to set_padding_mask, not both")
    context = None
    if mask is not None:
        context = ("mask", mask)
    elif lengths is not None:
        context = ("lengths", lengths)
    for _, layer in layers:
        layer.padding_context = context


@contextmanager
def padding_mask(model, mask=None, lengths=None):
    """Context manager form of :func:`set_padding_mask` that clears the mask on exit: the
    one way a caller (a Brain, an exported model) gives a model's MoE layers the padding of
    a batch. Without MoE layers it does nothing.

    Example
    -------
    >>> model = nn.Sequential(MoE(4, 2))
    >>> with padding_mask(model, lengths=torch.tensor([0.5])):
    ...     y = model(torch.randn(1, 4, 4))
    >>> model[0].padding_context is None
    True
    """
    layers = moe_layers(model)  # one walk per batch, not two
    _set_padding(layers, mask, lengths)
    try:
        yield model
    finally:
        _set_padding(layers)


def set_moe_epoch(model, epoch):
    """Tells every balancing constraint in ``model`` the current (1-based) epoch.

    Call at the start of each epoch (e.g. in ``Brain.on_stage_start``); the constraint is
    off after its ``balance_epochs``.
    """
    for _, layer in moe_layers(model):
        if layer.constraint is not None:
            layer.constraint.epoch = int(epoch)
