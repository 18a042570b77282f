"""Grouped matrix products over contiguous per-expert row slices, and the custom operators
that let ``torch.compile`` capture them.

Top-k routing sorts the (token, expert) pairs by expert once; each expert's rows are then one
contiguous slice, multiplied by its weight with ``torch._grouped_mm`` where it works, else a
loop over slices. Rows go to and from frame order through a permutation and its inverse
(:class:`_DispatchRows`, :class:`_CombineRows`), so neither direction needs a scatter-add.
"""

import torch

KERNELS = ("auto", "grouped_mm", "loop", "per_expert")


def count_ids(ids, bins):
    """Counts of each value ``0 .. bins - 1`` in an integer tensor, without a host sync.

    ``torch.bincount`` reads the maximum back to the host on CUDA; ``histc`` does not. Values
    outside ``[0, bins)`` are not counted.

    Example
    -------
    >>> count_ids(torch.tensor([0, 2, 2, 3, 5]), 4)
    tensor([1, 0, 2, 1])
    """
    if ids.numel() == 0:
        return torch.zeros(bins, dtype=torch.long, device=ids.device)
    # histc bins [0, bins]: value v < bins lands in bin v; v = bins in the extra last bin.
    # Deterministic mode: CPU histc takes floats only, CUDA histc integers only.
    values = ids.clamp(-1, bins)
    values = values.float() if ids.device.type in ("cpu", "mps") else values.int()
    counts = torch.histc(values, bins=bins + 1, min=0, max=bins)
    return counts[:bins].long()


# ---------------------------------------------------------------------------------------------
# Grouped matrix multiplication over contiguous per-expert slices
# ---------------------------------------------------------------------------------------------

_GROUPED_MM_BROKEN = set()  # (device type, dtype) pairs on which torch._grouped_mm raised


def _grouped_mm_usable(x, weight):
    """Whether ``torch._grouped_mm`` can take these operands on this device."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if (x.device.type, x.dtype) in _GROUPED_MM_BROKEN:
        return False
    if x.dtype not in (torch.float32, torch.bfloat16) or weight.dtype != x.dtype:
        return False
    # The kernels need 16-byte aligned rows and base pointers.
    elem = x.element_size()
    if (x.shape[-1] * elem) % 16 or (weight.shape[-1] * elem) % 16:
        return False
    compiling = torch.compiler.is_compiling()
    if compiling and x.dtype != torch.bfloat16:  # torch.compile traces it for bf16 only
        return False
    if x.device.type == "cpu":
        # no pointers while tracing (the freshly gathered rows are aligned)
        return compiling or (x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0)
    if x.device.type == "cuda":
        return torch.cuda.get_device_capability(x.device) >= (8, 0)
    return False


def _loop_grouped_mm(x, weight, offsets):
    """Reference-speed fallback: one matmul per expert on its contiguous slice of ``x``."""
    pieces = []
    start = 0
    for i, end in enumerate(offsets.tolist()):  # one device sync for all experts
        if end > start:
            pieces.append(x[start:end] @ weight[i])
        start = end
    if start < x.shape[0]:  # rows of no expert (padding, dropped): zeros
        pieces.append(x.new_zeros(x.shape[0] - start, weight.shape[-1]))
    # cat, not slice assignment: its backward hands each slice its gradient without copies
    return torch.cat(pieces) if pieces else x.new_zeros(0, weight.shape[-1])


def grouped_matmul(x, weight, offsets, kernel="auto"):
    """Multiplies each contiguous row slice of ``x`` by its own expert's weight.

    Under ``torch.compile`` the product stays in the graph: bf16 as ``torch._grouped_mm``
    (which torch traces for bf16 only), anything else as one opaque operator (the loop over
    slices has data-dependent shapes, a graph break at every call).

    Arguments
    ---------
    x : torch.Tensor
        [S, D] rows sorted by expert.
    weight : torch.Tensor
        [N, D, O] stacked expert weights.
    offsets : torch.Tensor
        [N] int32 cumulative row counts: expert i owns rows ``offsets[i-1]:offsets[i]``.
        Rows at and after ``offsets[-1]`` are not computed and hold arbitrary values.
    kernel : str
        "auto" (``torch._grouped_mm`` where it works, else "loop"), "grouped_mm" or "loop".

    Returns
    -------
    torch.Tensor
        [S, O]

    Example
    -------
    >>> x = torch.randn(6, 8)
    >>> w = torch.randn(2, 8, 4)
    >>> y = grouped_matmul(x, w, torch.tensor([2, 6], dtype=torch.int32))
    >>> torch.allclose(y, torch.cat([x[:2] @ w[0], x[2:] @ w[1]]), atol=1e-5)
    True
    """
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    else:
        weight = weight.to(x.dtype)
    if torch.compiler.is_compiling() and (kernel == "loop" or not _grouped_mm_usable(x, weight)):
        return _opaque_grouped_matmul(x, weight, offsets, kernel)
    return _eager_grouped_matmul(x, weight, offsets, kernel)


def _eager_grouped_matmul(x, weight, offsets, kernel):
    """:func:`grouped_matmul` on operands in one dtype, outside a compiled graph."""
    if kernel == "loop" or (kernel == "auto" and not _grouped_mm_usable(x, weight)):
        return _loop_grouped_mm(x, weight, offsets)
    try:
        return torch._grouped_mm(x, weight, offs=offsets)
    except RuntimeError:
        if kernel == "grouped_mm":
            raise
        _GROUPED_MM_BROKEN.add((x.device.type, x.dtype))
        return _loop_grouped_mm(x, weight, offsets)


def _eager_grouped_weight_grad(x, grad, offsets, kernel):
    """Per-expert weight gradients [N, D, O]: ``x[slice_i].T @ grad[slice_i]``."""
    if kernel != "loop" and _grouped_mm_usable(x, grad):
        try:
            return torch._grouped_mm(x.t(), grad, offs=offsets)
        except RuntimeError:
            pass
    pieces, start = [], 0
    for end in offsets.tolist():
        pieces.append(x[start:end].t() @ grad[start:end])  # an empty slice gives zeros
        start = end
    return torch.stack(pieces)


# Opaque operators for compiled graphs: torch.compile sees their output shapes only. They
# read the offsets on the host (our loop, or ATen's own fallback for anything but bf16 on
# sm90+), which a CUDA graph cannot record: the tag has inductor's CUDA graphs (mode
# "reduce-overhead") record the rest of the graph around them instead of failing.
_HOST_SYNCING = (torch.Tag.cudagraph_unsafe,)


@torch.library.custom_op("sb_crossmodal_kd::grouped_matmul", mutates_args=(),
                         tags=_HOST_SYNCING)
def _opaque_grouped_matmul(
    x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, kernel: str
) -> torch.Tensor:
    return _eager_grouped_matmul(x, weight, offsets, kernel)


@_opaque_grouped_matmul.register_fake
def _(x, weight, offsets, kernel):
    return x.new_empty(x.shape[0], weight.shape[-1])


@torch.library.custom_op("sb_crossmodal_kd::grouped_weight_grad", mutates_args=(),
                         tags=_HOST_SYNCING)
def _opaque_grouped_weight_grad(
    x: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor, kernel: str
) -> torch.Tensor:
    return _eager_grouped_weight_grad(x, grad, offsets, kernel)


@_opaque_grouped_weight_grad.register_fake
def _(x, grad, offsets, kernel):
    return x.new_empty(offsets.shape[0], x.shape[-1], grad.shape[-1])


def _grouped_matmul_setup(ctx, inputs, output):
    x, weight, offsets, kernel = inputs
    ctx.save_for_backward(x, weight, offsets)
    ctx.kernel = kernel


def _grouped_matmul_backward(ctx, grad):
    x, weight, offsets = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = _opaque_grouped_matmul(grad, weight.transpose(-2, -1), offsets, ctx.kernel)
    if ctx.needs_input_grad[1]:
        grad_w = _opaque_grouped_weight_grad(x, grad, offsets, ctx.kernel)
    return grad_x, grad_w, None, None


_opaque_grouped_matmul.register_autograd(_grouped_matmul_backward,
                                         setup_context=_grouped_matmul_setup)


class _DispatchRows(torch.autograd.Function):
    """Input rows in expert order: ``rows[j] = x[perm[j] // k]`` for the (frame, expert) pairs
    ``perm`` sorted by expert (pairs numbered frame-major, as ``top_i.reshape(-1)``: pair p
    belongs to frame p // k).

    Autograd's backward of such a gather is a scatter-add (atomics, or a sort in
    deterministic mode). Here each frame's k row gradients are put back in pair order with the
    inverse permutation and summed: two plain kernels, deterministic. Rows flagged ``skip``
    (padding, dropped) were not computed by the experts and get no gradient.
    """

    @staticmethod
    def forward(ctx, x, perm, inverse, skip):
        ctx.save_for_backward(inverse, skip)
        ctx.frames = x.shape[0]
        k = perm.shape[0] // x.shape[0]
        return x.index_select(0, torch.div(perm, k, rounding_mode="floor"))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        inverse, skip = ctx.saved_tensors
        if skip is not None:
            grad = grad.masked_fill(skip, 0.0)
        grad_x = grad.index_select(0, inverse).view(ctx.frames, -1, grad.shape[-1]).sum(1)
        return grad_x, None, None, None


class _CombineRows(torch.autograd.Function):
    """Expert-ordered output rows back in frame order, weighted by their gates and summed
    over each frame's k choices: ``out[m] = sum_c weights[m, c] * ys[inverse[m * k + c]]``.
    Rows flagged ``skip`` (never computed: arbitrary values) count as zero. Backward is the
    forward permutation, again without atomics. The weighting is inside so that backward
    controls the layout of the [M, k, O] gradient: traced by torch.compile, autograd's
    version met a layout other than the one the graph had assumed."""

    @staticmethod
    def forward(ctx, ys, weights, perm, inverse, skip):
        if skip is not None:
            ys = ys.masked_fill(skip, 0.0)
        pairs = ys.index_select(0, inverse).view(*weights.shape, ys.shape[-1])  # [M, k, O]
        ctx.save_for_backward(pairs, weights, perm, skip)
        return (pairs * weights.unsqueeze(-1)).sum(1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        pairs, weights, perm, skip = ctx.saved_tensors
        grad = grad.to(pairs.dtype)
        grad_weights = (pairs * grad.unsqueeze(1)).sum(-1)
        grad_pairs = grad.unsqueeze(1) * weights.unsqueeze(-1)  # [M, k, O], pair order
        grad_ys = grad_pairs.reshape(-1, grad.shape[-1]).index_select(0, perm)
        if skip is not None:
            grad_ys = grad_ys.masked_fill_(skip, 0.0)
        return grad_ys, grad_weights, None, None, None
