"""Gradient steps shared by the ranks, with weights that do not depend on how many there are.

The phone model of the forced aligner trains on every rank under ``torchrun``. Averaging
gradients as DDP does would make the weights depend on the number of ranks (the order of
the additions changes), and the data chain promises the same bytes however many processes
build it. So each batch is split into a fixed number of parts (:func:`part_ranges`); the
ranks compute the parts' gradients in turn, gather them exactly, and every rank adds them
in part order and takes the same optimiser step (:func:`shared_step`): the arithmetic of one
process computing every part, on any number of ranks.

Batch normalisation normalises each part by its own statistics (as ghost batch norm); its
running statistics are updated, part after part, from the parts' batch statistics gathered
with the gradients, so they too are the same on every rank. A model that draws random
numbers in its forward pass (dropout) would draw different ones on each rank: the phone
model draws none.
"""

import contextlib

import torch

from sb_crossmodal_kd.distributed import gather_tensors, rank, world_size

__all__ = ["part_ranges", "shared_step"]


def part_ranges(n, parts):
    """``parts`` contiguous ``(start, stop)`` ranges covering ``range(n)``, some maybe empty.

    Example
    -------
    >>> part_ranges(5, 3), part_ranges(1, 3)
    ([(0, 2), (2, 4), (4, 5)], [(0, 1), (1, 1), (1, 1)])
    """
    size = -(-n // parts)
    bounds = [min(n, part * size) for part in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def shared_step(model, optimiser, loss_of_part, parts):
    """One optimiser step on a batch whose loss is the sum of ``parts`` parts' losses.

    Each rank computes the parts ``rank, rank + world_size, ...``; their gradients, losses
    and batch-norm statistics are gathered exactly, and every rank adds them in part order:
    every rank takes the same step, the one a single process computing all the parts takes.
    A collective under DDP: every rank calls it, once per batch, with the same ``parts``.

    Arguments
    ---------
    model : torch.nn.Module
        In training mode.
    optimiser : torch.optim.Optimizer
        Over ``model``'s parameters.
    loss_of_part : callable
        ``loss_of_part(part)``: the scalar loss of part ``part`` (0 to ``parts - 1``), or
        None for an empty part.
    parts : int

    Returns
    -------
    torch.Tensor
        The batch's loss (the parts' sum), on the model's device: no host sync.

    Example
    -------
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Linear(3, 1)
    >>> optimiser = torch.optim.SGD(model.parameters(), lr=0.01)  # small: a step lowers the loss
    >>> x, y = torch.randn(4, 3), torch.randn(4, 1)
    >>> def loss_of_part(part):
    ...     start, stop = part_ranges(4, 2)[part]
    ...     return ((model(x[start:stop]) - y[start:stop]) ** 2).sum()
    >>> before = ((model(x) - y) ** 2).sum()
    >>> loss = shared_step(model, optimiser, loss_of_part, parts=2)
    >>> torch.allclose(loss, before), bool(((model(x) - y) ** 2).sum() < before)
    (True, True)
    """
    params = [p for p in model.parameters() if p.requires_grad]
    norms = _running_norms(model)
    before = [(norm.running_mean.clone(), norm.running_var.clone(),
               norm.num_batches_tracked.clone()) for norm in norms]
    sizes = [p.numel() for p in params] + [2 * norm.num_features for norm in norms] + [1, 1]
    ranks, me = world_size(), rank()
    rows = torch.zeros(-(-parts // ranks), sum(sizes), device=params[0].device)
    momenta = [norm.momentum for norm in norms]
    try:
        for norm in norms:
            # Running statistics replaced by the batch's: each part's forward pass leaves
            # its own batch mean and unbiased variance there, computed by the layer itself.
            norm.momentum = 1.0
        for slot, part in enumerate(range(me, parts, ranks)):
            for norm in norms:  # from zero, the update is the batch's value exactly
                norm.running_mean.zero_()
                norm.running_var.zero_()
            with _one_call_each(norms):
                loss = loss_of_part(part)
            if loss is None:
                continue
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                       for g, p in zip(grads, params, strict=True)]
                      + [torch.cat([norm.running_mean, norm.running_var]) for norm in norms]
                      + [loss.detach().reshape(1), torch.ones(1, device=rows.device)],
                      out=rows[slot])
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
    gathered = gather_tensors(rows)  # (ranks, slots, width): part p at [p % ranks, p // ranks]
    in_order = [gathered[part % ranks, part // ranks] for part in range(parts)]
    total = in_order[0].clone()
    for row in in_order[1:]:
        total += row
    fields = torch.split(total, sizes)
    for p, grad in zip(params, fields, strict=False):
        p.grad = grad.view_as(p)
    optimiser.step()
    _update_running_statistics(norms, momenta, before, in_order, sizes, len(params))
    return fields[-2][0]


def _running_norms(model):
    """The batch-norm layers whose running statistics a training forward pass updates."""
    return [module for module in model.modules()
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
            and module.training and module.track_running_stats]


@contextlib.contextmanager
def _one_call_each(norms):
    """Refuses a batch-norm layer called twice in one part's forward pass: its running
    statistics would hold the second call's batch only."""
    calls = dict.fromkeys(norms, 0)

    def count(module, inputs):
        calls[module] += 1
        if calls[module] > 1:
            raise ValueError("shared_step: a batch-norm layer ran twice in one part's forward "
                             "pass; its statistics of the part cannot be gathered")

    hooks = [norm.register_forward_pre_hook(count) for norm in norms]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _update_running_statistics(norms, momenta, before, in_order, sizes, n_params):
    """Sets each layer's running statistics from their values ``before`` the step (the
    layer's own updates during the local parts are discarded), updated part after part with
    the parts' gathered statistics, skipping empty parts: the same on every rank. Without a
    host sync: an empty part is skipped by selection, not by a branch."""
    rows = [torch.split(row, sizes) for row in in_order]
    for k, (norm, momentum_set, (mean, var, tracked)) in enumerate(
            zip(norms, momenta, before, strict=True)):
        for fields in rows:
            present = fields[-1][0] > 0
            part_mean, part_var = fields[n_params + k].chunk(2)
            tracked = tracked + present.long()
            momentum = momentum_set
            if momentum is None:  # a cumulative average
                momentum = 1.0 / tracked.clamp_min(1).to(mean.dtype)
            mean = torch.where(present, (1 - momentum) * mean + momentum * part_mean, mean)
            var = torch.where(present, (1 - momentum) * var + momentum * part_var, var)
        norm.running_mean.copy_(mean)
        norm.running_var.copy_(var)
        norm.num_batches_tracked.copy_(tracked)
