"""The experts of an MoE layer, stacked: one weight tensor per projection for all experts."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from sb_crossmodal_kd.nnet.moe.kernels import grouped_matmul

EXPERT_TYPES = ("relu", "ffn", "swiglu")


_CPU_BLOCK_ELEMENTS = 3 * 2**19  # activations a CPU computes in one piece (6 MB of float32)


def _cpu_eager(x):
    """Whether ``x`` is computed on a CPU outside torch.compile, where splitting the work into
    cache-sized pieces pays (a compiled graph cannot take data-dependent pieces)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def _per_expert_preferred(x, num_experts):
    """Whether "auto" runs experts one by one: on a CPU, with 256 or more rows per expert on
    average (where ``benchmarks/moe.py`` finds one expert at a time, in cache, faster than
    the grouped product)."""
    return _cpu_eager(x) and x.shape[0] >= 256 * num_experts


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
