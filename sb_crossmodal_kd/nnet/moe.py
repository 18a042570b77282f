"""Mixture-of-experts layers: stacked experts, gating, balancing, auxiliary losses, statistics.

One :class:`MoE` layer computes ``z = sum_i g_i(x) f_i(x)`` (Eigen et al. 2013) with either
dense softmax gating (every expert runs, as in the paper) or sparse top-k routing (only the k
best experts run, Shazeer et al. 2017). The layer keeps its auxiliary loss and its usage
statistics on itself; :func:`moe_auxiliary_loss` and :func:`collect_expert_stats` gather them
from any model in one call, so a Brain never needs to know where the MoE layers are.

Padding. Layers take ``(x, lengths=...)`` (SpeechBrain relative lengths) or ``(x, mask=...)``
(bool, True on real frames). Modules that call their feed-forward as ``ffn(x)`` (SpeechBrain's
Conformer and Transformer layers) cannot pass a mask, so the Brain sets it on every MoE layer
of the model before the forward pass with :func:`set_padding_mask` (or the context manager
:func:`padding_mask`). Relative lengths are resolved against each layer's own time axis, so
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

import math
import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from sb_crossmodal_kd.distributed import is_distributed, sum_across_processes
from sb_crossmodal_kd.lengths import lengths_to_mask

EXPERT_TYPES = ("relu", "ffn", "swiglu")
STAT_NAMES = ("gate_mass", "top1_count", "routed_count", "dropped_count", "entropy", "frames")
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


_CPU_BLOCK_ELEMENTS = 3 * 2**19  # activations a CPU computes in one piece (6 MB of float32)


def _cpu_eager(x):
    """Whether ``x`` is computed on a CPU outside torch.compile, where splitting the work into
    cache-sized pieces pays (a compiled graph cannot take data-dependent pieces)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def _per_expert_preferred(x, num_experts):
    """Whether "auto" runs experts one by one: on a CPU, with 256 or more rows per expert on
    average.

    Measured on one CPU thread (d=256, SwiGLU 1024, 8 experts, top-2), per-expert time over
    grouped time: 1.15 at 200 frames, 0.97 at 800, 0.83 at 3,200.
    """
    return _cpu_eager(x) and x.shape[0] >= 256 * num_experts


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


# ---------------------------------------------------------------------------------------------
# Experts
# ---------------------------------------------------------------------------------------------


class _SwiGLU(torch.autograd.Function):
    """``silu(gate) * up`` of a fused ``[gate | up]`` tensor, whose backward writes both halves'
    gradients straight into one buffer (autograd's chunk would concatenate them: one more
    full pass over the largest activation of the layer)."""

    @staticmethod
    def forward(ctx, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(gate_up, act)
        return act * up

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        gate_up, act = ctx.saved_tensors
        half = act.shape[-1]
        gate, up = gate_up[..., :half], gate_up[..., half:]
        grad = grad.to(act.dtype)
        if torch.compiler.is_compiling():  # Dynamo cannot trace out= into a strided slice
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
            return torch.cat([grad_gate, grad * act], dim=-1)
        grad_in = torch.empty_like(gate_up)
        torch.mul(grad, act, out=grad_in[..., half:])
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_in[..., :half])
        return grad_in


def swiglu(gate_up):
    """SwiGLU activation of a fused ``[..., 2H]`` gate/up projection -> ``[..., H]``.

    Example
    -------
    >>> gate_up = torch.randn(3, 8)
    >>> gate, up = gate_up.chunk(2, dim=-1)
    >>> torch.allclose(swiglu(gate_up), F.silu(gate) * up)
    True
    """
    return _SwiGLU.apply(gate_up)


class StackedExperts(nn.Module):
    """N experts of one shape whose weights are stacked on a leading expert dimension.

    Expert types:

    - ``"relu"``: the paper's expert, one rectified linear layer ``relu(W_i x + b_i)``.
    - ``"ffn"``: SpeechBrain's position-wise feed-forward, ``W2_i act(W1_i x + b1_i) + b2_i``.
    - ``"swiglu"``: ``W2_i (silu(Wg_i x) * (Wu_i x))`` with the gate and up projections fused
      into one weight so that one GEMM computes both.

    Arguments
    ---------
    num_experts : int
        Number of experts N.
    input_size : int
        Input feature size D.
    output_size : int
        Output feature size O.
    expert : str
        One of "relu", "ffn", "swiglu".
    hidden_size : int, optional
        Inner size H of "ffn" and "swiglu" experts.
    activation : type
        Activation class of "relu" and "ffn" experts (default ``nn.ReLU``).
    dropout : float
        Dropout on the hidden activations of "ffn" and "swiglu" experts.
    bias : bool
        Whether the projections have biases (default: True except for "swiglu").

    Example
    -------
    >>> experts = StackedExperts(4, 16, 8, expert="ffn", hidden_size=32)
    >>> x = torch.randn(10, 16)
    >>> gates = torch.softmax(torch.randn(10, 4), dim=-1)
    >>> experts.forward_dense(x, gates).shape
    torch.Size([10, 8])
    """

    def __init__(
        self,
        num_experts,
        input_size,
        output_size,
        expert="relu",
        hidden_size=None,
        activation=nn.ReLU,
        dropout=0.0,
        bias=None,
    ):
        super().__init__()
        if expert not in EXPERT_TYPES:
            raise ValueError(f"expert={expert!r} is not one of {EXPERT_TYPES}")
        if expert in ("ffn", "swiglu") and (hidden_size is None or hidden_size < 1):
            raise ValueError(f"expert={expert!r} needs expert hidden_size >= 1, got {hidden_size}")
        for name, value in (("num_experts", num_experts), ("input_size", input_size),
                            ("output_size", output_size)):
            if value is None or value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.num_experts = num_experts
        self.input_size = input_size
        self.output_size = output_size
        self.expert = expert
        self.hidden_size = output_size if expert == "relu" else hidden_size
        if bias is None:
            bias = expert != "swiglu"
        self.activation = nn.SiLU() if expert == "swiglu" else activation()
        self.dropout = nn.Dropout(dropout)

        n, d, h, o = num_experts, input_size, self.hidden_size, output_size
        first_out = 2 * h if expert == "swiglu" else h
        # Weights are [N, in, out] so that x @ w needs no transpose in the grouped kernel.
        self.w_in = nn.Parameter(torch.empty(n, d, first_out))
        self.b_in = nn.Parameter(torch.zeros(n, first_out)) if bias else None
        if expert == "relu":
            self.w_out = self.b_out = None
        else:
            self.w_out = nn.Parameter(torch.empty(n, h, o))
            self.b_out = nn.Parameter(torch.zeros(n, o)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        """Initialises each expert like ``nn.Linear`` (uniform, bound 1/sqrt(fan_in))."""
        for w in (self.w_in, self.w_out):
            if w is not None:
                bound = 1.0 / math.sqrt(w.shape[1])
                nn.init.uniform_(w, -bound, bound)
        for b, fan_in in ((self.b_in, self.input_size), (self.b_out, self.hidden_size)):
            if b is not None:
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(b, -bound, bound)

    def _hidden(self, pre):
        """Activation of the first projection's output (SwiGLU splits the fused halves)."""
        if self.expert == "swiglu":
            return swiglu(pre)
        return self.activation(pre)

    def forward_dense(self, x, gates):
        """Mixture of all experts, ``sum_i gates[:, i] * f_i(x)``, in one GEMM per projection.

        Arguments
        ---------
        x : torch.Tensor
            [M, D]
        gates : torch.Tensor
            [M, N] gate values.

        Returns
        -------
        torch.Tensor
            [M, O]
        """
        d = self.input_size
        # [D, N * H'] weight so that all experts' first projections are one GEMM.
        w_in = self.w_in.permute(1, 0, 2).reshape(d, -1).to(x.dtype)
        b_in = None if self.b_in is None else self.b_in.reshape(-1).to(x.dtype)
        if _cpu_eager(x):
            # Blocks of rows whose [rows, N * H'] activations (~6 MB) stay in a CPU's cache
            # between the GEMM, the activation and the mixing: 0.85-0.88 of the time of one
            # block over 3,200 frames (4 x 1024 ReLU experts, one thread).
            rows = max(256, _CPU_BLOCK_ELEMENTS // w_in.shape[1])
            if x.shape[0] > rows:
                blocks = zip(x.split(rows), gates.split(rows), strict=True)
                return torch.cat([self._dense_block(xb, gb, w_in, b_in) for xb, gb in blocks])
        return self._dense_block(x, gates, w_in, b_in)

    def _dense_block(self, x, gates, w_in, b_in):
        """:meth:`forward_dense` of the rows ``x`` [M, D] with the stacked first weights."""
        m, n = x.shape[0], self.num_experts
        pre = x @ w_in if b_in is None else torch.addmm(b_in, x, w_in)
        hidden = self._hidden(pre.view(m, n, -1))  # [M, N, H]
        gates = gates.to(hidden.dtype)
        if self.expert == "relu":
            if hidden.is_cuda:
                # on an H100 the [M, 1, N] x [M, N, H] bmm's backward took 0.17 ms, the
                # multiply-and-sum a fraction of it
                return (hidden * gates.unsqueeze(-1)).sum(1)
            # on CPU the bmm is twice as fast (no [M, N, H] product to write and read back)
            return torch.bmm(gates.unsqueeze(1), hidden).squeeze(1)
        # sum_i g_i (h_i W2_i + b2_i) = [g_1 h_1, ..., g_N h_N] @ [W2_1; ...; W2_N] + g @ b2
        mixed = (self.dropout(hidden) * gates.unsqueeze(-1)).reshape(m, -1)
        out = mixed @ self.w_out.reshape(-1, self.output_size).to(mixed.dtype)
        if self.b_out is not None:
            out = out + gates @ self.b_out.to(gates.dtype)
        return out

    def forward_grouped(self, x, expert_ids, offsets, kernel="auto", skip=None):
        """Runs each expert on its contiguous slice of expert-sorted rows.

        Arguments
        ---------
        x : torch.Tensor
            [S, D] rows sorted by expert.
        expert_ids : torch.Tensor
            [S] expert of each row (used for the biases), in [0, N); rows flagged in
            ``skip`` may hold any id up to N.
        offsets : torch.Tensor
            [N] int32 cumulative row counts per expert.
        kernel : str
            "per_expert" runs each expert's whole computation on its slice ("auto" does so
            on a CPU for large batches); the others run each projection over all slices, see
            :func:`grouped_matmul`.
        skip : torch.Tensor, optional
            [S, 1] bool, True on the rows after ``offsets[-1]``. The kernel leaves those rows
            (and their gradients) uninitialised; masking the gathered bias keeps that garbage
            out of the bias gradient.

        Returns
        -------
        torch.Tensor
            [S, O] unweighted expert outputs; rows after ``offsets[-1]`` are arbitrary.
        """
        if kernel == "per_expert" or (
            kernel == "auto" and _per_expert_preferred(x, self.num_experts)
        ):
            return self._forward_per_expert(x, offsets)
        pre = grouped_matmul(x, self.w_in, offsets, kernel)
        if skip is not None and (self.b_in is not None or self.b_out is not None):
            expert_ids = expert_ids.clamp(max=self.num_experts - 1)
        if self.b_in is not None:
            bias = self.b_in[expert_ids]
            if skip is not None and self.expert != "relu":
                bias = bias.masked_fill(skip, 0.0)
            pre = pre + bias
        hidden = self._hidden(pre)
        if self.expert == "relu":
            return hidden
        out = grouped_matmul(self.dropout(hidden), self.w_out, offsets, kernel)
        if self.b_out is not None:
            out = out + self.b_out[expert_ids]
        return out

    def _forward_per_expert(self, x, offsets):
        """Each expert's projections and activation on its own slice, one expert at a time.

        On a CPU this is the fast order: an expert's intermediate activations (a few MB) are
        still in cache when the next operation reads them, and each is small enough for the
        allocator to reuse its memory (a [S, 2H] buffer above glibc's 32 MB mmap threshold is
        mapped, page-faulted and unmapped again at every step).
        """
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        ends = offsets.tolist()  # free on a CPU; one sync elsewhere
        sizes = [end - start for start, end in zip([0] + ends[:-1], ends, strict=True)]
        # split/unbind, not indexing: their backward assembles the gradient once
        pieces = x.split(sizes + [x.shape[0] - ends[-1]])
        params = [p.to(x.dtype).unbind(0) if p is not None else [None] * self.num_experts
                  for p in (self.w_in, self.b_in, self.w_out, self.b_out)]
        outs = [self._expert(piece, *(p[i] for p in params))
                for i, piece in enumerate(pieces[:-1]) if piece.shape[0] > 0]
        if pieces[-1].shape[0] > 0:  # rows of no expert (padding, dropped): zeros
            outs.append(x.new_zeros(pieces[-1].shape[0], self.output_size))
        return torch.cat(outs) if outs else x.new_zeros(0, self.output_size)

    def _expert(self, x, w_in, b_in, w_out, b_out):
        """One expert with weights ``w_in`` [D, H'], ``w_out`` [H, O] on ``x`` [M, D]."""
        pre = x @ w_in if b_in is None else torch.addmm(b_in, x, w_in)
        hidden = self._hidden(pre)
        if self.expert == "relu":
            return hidden
        hidden = self.dropout(hidden)
        return hidden @ w_out if b_out is None else torch.addmm(b_out, hidden, w_out)

    def extra_repr(self):
        return (f"num_experts={self.num_experts}, expert={self.expert!r}, "
                f"input_size={self.input_size}, hidden_size={self.hidden_size}, "
                f"output_size={self.output_size}")


# ---------------------------------------------------------------------------------------------
# Gating
# ---------------------------------------------------------------------------------------------


def _at_least_float32(x):
    """``x`` in float32, or as it is when wider (float64 stays float64)."""
    return x if x.dtype == torch.float64 else x.float()


class Router(nn.Module):
    """Gating network: logits over experts from a linear map or one hidden rectified layer.

    With ``noisy=True`` (Shazeer et al. 2017) training adds Gaussian noise with a learned,
    input-dependent scale ``softplus(W_noise x)`` to the logits; evaluation is noise-free.

    Arguments
    ---------
    input_size : int
        Input feature size.
    num_experts : int
        Number of experts.
    hidden_size : int, optional
        Size of the hidden rectified layer; None for a linear gate.
    noisy : bool
        Whether to add learned noise to the logits during training.

    Example
    -------
    >>> router = Router(16, 4, hidden_size=8)
    >>> router(torch.randn(5, 16)).shape
    torch.Size([5, 4])
    """

    def __init__(self, input_size, num_experts, hidden_size=None, noisy=False):
        super().__init__()
        if hidden_size is None:
            self.net = nn.Linear(input_size, num_experts)
        else:
            if hidden_size < 1:
                raise ValueError(f"gate_hidden_size must be >= 1 or None, got {hidden_size}")
            self.net = nn.Sequential(
                nn.Linear(input_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, num_experts)
            )
        self.noise = None
        if noisy:
            self.noise = nn.Linear(input_size, num_experts)
            nn.init.zeros_(self.noise.weight)
            nn.init.zeros_(self.noise.bias)

    def forward(self, x):
        """Logits [M, N] in float32 or wider, in the weights' precision even under autocast.

        A bf16 router flips the top-k choice of frames whose best experts are close, a
        discrete change of the layer's output; the router is a tiny GEMM, so float32 is cheap.
        """
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self._logits(x.to(self.weight_dtype))
        return self._logits(x.to(self.weight_dtype))

    def _logits(self, x):
        logits = _at_least_float32(self.net(x))
        if self.noise is not None and self.training:
            scale = F.softplus(_at_least_float32(self.noise(x)))
            logits = logits + torch.randn_like(logits) * scale
        return logits

    @property
    def weight_dtype(self):
        """Dtype of the router's own weights (float32 unless the model was cast)."""
        first = self.net if isinstance(self.net, nn.Linear) else self.net[0]
        return first.weight.dtype


class BalancingConstraint(nn.Module):
    """The paper's constraint that keeps every expert in use during a first training phase.

    Keeps per-expert running totals ``G_i`` of the gate mass each expert has received. While
    active, an expert with ``G_i - min_j G_j > margin`` gets gate 0 and the gate is
    renormalised. The paper decides example by example; here frames are taken in chunks of
    ``chunk_size`` (default: the whole batch), each decided from the totals left by the
    previous chunks, so the spread ``max G - min G`` stays below ``margin + chunk_size``.
    ``chunk_size=1`` is the paper's rule exactly (and a Python loop over frames).

    Only differences between totals matter, so they are stored relative to their minimum:
    they stay small and exact in float32 however long training runs.

    Under DDP each process decides its own frames from the totals shared at the start of the
    batch, then the mass of all processes is added (one all-reduce per batch), so every rank
    holds the same totals; the spread bound becomes ``margin + world_size * chunk_size``.

    The constraint is active in training mode up to and including epoch ``phase_epochs``
    (1-based, as SpeechBrain counts; set with :func:`set_moe_epoch`) and for the first
    ``phase_steps`` training batches; with neither it is always active. State (totals, steps,
    epoch) is in ``state_dict``: totals as a buffer, counters as extra state, so SpeechBrain's
    Checkpointer saves and restores them with the model that holds the layer.

    Arguments
    ---------
    num_experts : int
        Number of experts.
    margin : float
        Margin m >= 0, in units of gate mass (one frame gives mass 1 in total).
    phase_epochs : int, optional
        Last epoch of phase one.
    phase_steps : int, optional
        Number of training batches of phase one.
    chunk_size : int, optional
        Frames decided together (None: the whole batch).

    Example
    -------
    >>> constraint = BalancingConstraint(3, margin=0.5).train()
    >>> probs = torch.tensor([[0.8, 0.1, 0.1], [0.8, 0.1, 0.1]])
    >>> constraint(probs, torch.tensor([True, True]))
    tensor([[0.8000, 0.1000, 0.1000],
            [0.8000, 0.1000, 0.1000]])
    >>> constraint(probs, torch.tensor([True, True]))  # expert 0 is now 1.4 ahead: off
    tensor([[0.0000, 0.5000, 0.5000],
            [0.0000, 0.5000, 0.5000]])
    """

    def __init__(self, num_experts, margin, phase_epochs=None, phase_steps=None,
                 chunk_size=None):
        super().__init__()
        if margin is None or margin < 0:
            raise ValueError(f"balance_margin must be >= 0, got {margin}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"balance_chunk_size must be >= 1 or None, got {chunk_size}")
        self.chunk_size = chunk_size
        for name, value in (("balance_epochs", phase_epochs), ("balance_steps", phase_steps)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {value}")
        self.margin = float(margin)
        self.phase_epochs = phase_epochs
        self.phase_steps = phase_steps
        self.register_buffer("totals", torch.zeros(num_experts))
        self.steps = 0
        self.epoch = 0

    @property
    def active(self):
        """Whether the constraint applies to the next training batch."""
        if not self.training:
            return False
        if self.phase_steps is not None and self.steps >= self.phase_steps:
            return False
        return self.phase_epochs is None or self.epoch <= self.phase_epochs

    # Outside torch.compile's graph: the phase is decided on Python counters, which a graph
    # would guard on (a recompilation at every step); a graph break here costs far less.
    @torch.compiler.disable
    def forward(self, probs, valid, select=None):
        """Constrains gate distributions and adds the gate mass used to the running totals.

        Arguments
        ---------
        probs : torch.Tensor
            [M, N] gate distributions.
        valid : torch.Tensor or None
            [M] bool, False on padding (not counted); None when every frame is real.
        select : callable, optional
            Maps constrained distributions [c, N] to the gates actually used [c, N] (e.g.
            top-k, renormalised); default: the distributions themselves.

        Returns
        -------
        torch.Tensor
            [M, N] constrained, renormalised distributions (``probs`` itself when inactive).
        """
        if not self.active:
            return probs
        if valid is None:
            valid = torch.ones(probs.shape[0], dtype=torch.bool, device=probs.device)
        size = self.chunk_size or max(probs.shape[0], 1)
        pieces = []
        distributed = is_distributed()
        start_totals = self.totals.clone()
        batch_mass = torch.zeros_like(self.totals)
        for start in range(0, probs.shape[0], size):
            piece = self.constrain(probs[start : start + size])
            used = piece if select is None else select(piece)
            self.record(used, valid[start : start + size])
            if distributed:
                batch_mass += self.gate_mass(used, valid[start : start + size])
            pieces.append(piece)
        if distributed:
            # Each process decided its own frames from the shared totals; all then add the
            # mass of every process, so the totals stay identical on all ranks.
            (global_mass,) = sum_across_processes([batch_mass])
            totals = start_totals + global_mass
            self.totals.copy_(totals - totals.min())
        self.steps += 1
        return torch.cat(pieces) if len(pieces) != 1 else pieces[0]

    def constrain(self, probs):
        """Zeroes the gates of experts ahead by more than the margin and renormalises."""
        allowed = (self.totals - self.totals.min()) <= self.margin
        probs = probs * allowed.to(probs.dtype)
        return probs / probs.sum(-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)

    @staticmethod
    @torch.no_grad()
    def gate_mass(gates, valid):
        """Per-expert gate mass [N] of the valid rows of ``gates`` [M, N]."""
        return (gates.float() * valid.unsqueeze(-1).float()).sum(0)

    @torch.no_grad()
    def record(self, gates, valid):
        """Adds the gate mass of the valid rows of ``gates`` [M, N] to the totals."""
        totals = self.totals + self.gate_mass(gates, valid)
        self.totals.copy_(totals - totals.min())

    def get_extra_state(self):
        return {"steps": self.steps, "epoch": self.epoch}

    def set_extra_state(self, state):
        self.steps = int(state["steps"])
        self.epoch = int(state["epoch"])

    def extra_repr(self):
        return (f"margin={self.margin}, phase_epochs={self.phase_epochs}, "
                f"phase_steps={self.phase_steps}, chunk_size={self.chunk_size}")


# ---------------------------------------------------------------------------------------------
# The MoE layer
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Whole-model helpers
# ---------------------------------------------------------------------------------------------


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


def _warn_uncollected(layer):
    """Once per layer: its previous training pass's auxiliary loss was never collected."""
    if getattr(layer, "_warned_uncollected", False):
        return
    layer._warned_uncollected = True
    warnings.warn(
        "An MoE layer trained a second step without its load-balancing / z-loss being "
        "collected, so nothing keeps its experts balanced: add "
        "sb_crossmodal_kd.nnet.moe.moe_auxiliary_loss(model) to the loss after each forward "
        "pass (the package's KDBrain and FrameBrain do), or set load_balancing_weight and "
        "z_loss_weight to 0 if that is intended.",
        stacklevel=3,
    )


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
    if mask is not None and lengths is not None:
        raise ValueError("give either mask or lengths to set_padding_mask, not both")
    context = None
    if mask is not None:
        context = ("mask", mask)
    elif lengths is not None:
        context = ("lengths", lengths)
    for _, layer in moe_layers(model):
        layer.padding_context = context


@contextmanager
def padding_mask(model, mask=None, lengths=None):
    """Context manager form of :func:`set_padding_mask` that clears the mask on exit.

    Example
    -------
    >>> model = nn.Sequential(MoE(4, 2))
    >>> with padding_mask(model, lengths=torch.tensor([0.5])):
    ...     y = model(torch.randn(1, 4, 4))
    >>> model[0].padding_context is None
    True
    """
    set_padding_mask(model, mask=mask, lengths=lengths)
    try:
        yield model
    finally:
        set_padding_mask(model)


def set_moe_epoch(model, epoch):
    """Tells every balancing constraint in ``model`` the current (1-based) epoch.

    Call at the start of each epoch (e.g. in ``Brain.on_stage_start``); the constraint is
    off after its ``balance_epochs``.
    """
    for _, layer in moe_layers(model):
        if layer.constraint is not None:
            layer.constraint.epoch = int(epoch)
