"""The one teacher interface: unit sequences in, one distribution per position out.

Every teacher (a unit LM trained here, a transformers causal or masked LM, a SpeechBrain
pretrained LM) and the teacher cache give the same thing, so the losses never know which one
they got.

What position ``k`` predicts
----------------------------
The input is the unit sequence ``y_1..y_K`` of an utterance, *without* any sentence-boundary
token: ``unit_ids[b, k]`` is the unit at position ``k`` (0-based here). The output at
position ``k`` is the teacher's distribution **for the unit at position k**:

* causal teachers (``context == "causal"``): ``q_k = P(y_k | y_<k)``. Predicting ``y_1``
  needs a history, so every causal teacher prepends its own beginning-of-sentence token
  internally (its LM's BOS id, e.g. GPT-2's ``<|endoftext|>``) and drops the last unit from
  the input: the network reads ``[BOS, y_1, ..., y_{K-1}]`` and its output ``k`` is ``q_k``.
  Callers never add a BOS themselves.
* bidirectional teachers (``context == "bidirectional"``, masked LMs):
  ``q_k = P(y_k | y_{!=k})``, the unit at ``k`` masked, all others visible.

The distribution covers the unit vocabulary ``0..vocab_size-1`` only. Tokens of the LM that are
not units (BOS/EOS, padding, a masked LM's ``[MASK]``/``[CLS]``, ids the user excludes) get
probability zero and the rest is renormalised, i.e. ``q_k`` is the LM's prediction conditioned
on "position k holds a unit" (the sentence does not end at k, since we know it does not).
A temperature ``tau`` divides the logits before the softmax: ``q = softmax(z / tau)``.

Lengths are SpeechBrain relative lengths (floating, in ``(0, 1]``, times the padded length) or
absolute lengths (integer); positions past an utterance's length are padding.

The top-k triple
----------------
:class:`TopKDistributions`, returned by :meth:`Teacher.distributions` and by the cache:

* ``top_probs``: float32 ``[batch, K, k]``, the ``k`` largest probabilities, descending;
* ``top_ids``: int64 ``[batch, K, k]``, their unit ids (distinct within a position);
* ``residual``: float32 ``[batch, K]``, the mass outside the top k, ``1 - sum(top_probs)``
  clamped at 0 (from a cache the top-k part was rounded to float16, so top-k plus residual
  sums to one within float16 rounding, about 1e-3).

Padding positions hold zeros in all three (no distribution): mask them by the lengths.

Distillation with a top-k distribution
--------------------------------------
:func:`kl_divergence` computes ``KL(q || p)`` per position for a student ``p``. The teacher is
known exactly on its top-k ids; its residual mass ``r`` is spread over the other ids
**in proportion to the student's own probabilities** there, ``q_j = r * p_j / P_rest`` with
``P_rest = sum of p over the non-top-k ids``. The tail then contributes exactly
``r * log(r / P_rest)``: the result is the exact KL between teacher and student both coarsened
to the classes {each top-k id, "everything else"}. It never invents a tail shape the teacher
did not give, never exceeds the full KL, and equals it when ``k`` covers the vocabulary.
:meth:`TopKDistributions.to_dense` spreads the residual uniformly instead, for consumers that
need a full target vector without a student (e.g. label interpolation).

Example
-------
>>> class Unigram(Teacher):
...     def unit_logits(self, unit_ids, lengths):
...         return torch.zeros(*unit_ids.shape, self.vocab_size)
>>> teacher = Unigram(vocab_size=4, name="uniform")
>>> dist = teacher.distributions(torch.tensor([[1, 2, 3]]), torch.tensor([1.0]), k=2)
>>> dist.top_probs
tensor([[[0.2500, 0.2500],
         [0.2500, 0.2500],
         [0.2500, 0.2500]]])
>>> dist.residual
tensor([[0.5000, 0.5000, 0.5000]])
"""

from typing import NamedTuple

import torch

from sb_crossmodal_kd.lengths import lengths_to_mask

CAUSAL = "causal"
BIDIRECTIONAL = "bidirectional"


class TopKDistributions(NamedTuple):
    """Top-k teacher distributions; shapes and dtypes in the module docstring."""

    top_probs: torch.Tensor
    top_ids: torch.Tensor
    residual: torch.Tensor

    def to(self, device):
        """Moves the three tensors to ``device`` (non-blocking where possible)."""
        return TopKDistributions(
            *(t.to(device, non_blocking=True) for t in (self.top_probs, self.top_ids, self.residual))
        )

    def to_dense(self, vocab_size):
        """Full distributions ``[batch, K, vocab_size]``, the residual spread uniformly.

        The residual goes in equal shares to the ids outside the top k; a position whose top k
        covers the vocabulary drops it (it is float16 rounding then). Padding stays all zero.

        Example
        -------
        >>> dist = TopKDistributions(torch.tensor([[[0.5]]]), torch.tensor([[[2]]]),
        ...                          torch.tensor([[0.5]]))
        >>> dist.to_dense(3)
        tensor([[[0.2500, 0.2500, 0.5000]]])
        """
        k = self.top_ids.shape[-1]
        rest = vocab_size - k
        share = self.residual / rest if rest > 0 else torch.zeros_like(self.residual)
        dense = share.unsqueeze(-1).expand(*self.residual.shape, vocab_size).clone()
        # Top-k slots get their own probability, not the share.
        dense.scatter_(-1, self.top_ids, self.top_probs.to(dense.dtype))
        return dense


def topk_from_log_probs(log_probs, k, mask=None):
    """The top-k triple of full distributions ``log_probs`` ``[batch, K, V]``.

    ``k`` larger than ``V`` is cut to ``V``. ``mask`` ``[batch, K]`` (True = real position)
    zeroes the padding positions.

    Example
    -------
    >>> log_probs = torch.tensor([[[0.7, 0.2, 0.1]]]).log()
    >>> dist = topk_from_log_probs(log_probs, k=1)
    >>> dist.top_ids, dist.residual
    (tensor([[[0]]]), tensor([[0.3000]]))
    """
    k = min(k, log_probs.shape[-1])
    top_log, top_ids = log_probs.float().topk(k, dim=-1, sorted=True)
    top_probs = top_log.exp()
    residual = (1.0 - top_probs.sum(-1)).clamp_min(0.0)
    if mask is not None:
        top_probs = top_probs * mask.unsqueeze(-1)
        top_ids = top_ids * mask.unsqueeze(-1)
        residual = residual * mask
    return TopKDistributions(top_probs, top_ids, residual)


def kl_divergence(dist, student_log_probs):
    """Per-position ``KL(q || p)`` of teacher ``dist`` and student log-probabilities.

    The teacher's residual is spread over the non-top-k ids in proportion to the student's
    probabilities there (see the module docstring), so the value is exact when the top k
    covers the vocabulary and a lower bound of the full KL otherwise. Computed in float32
    (AMP-safe); gradients flow into ``student_log_probs`` only.

    Arguments
    ---------
    dist : TopKDistributions
        Teacher distributions, ``[batch, K, k]`` / ``[batch, K]``.
    student_log_probs : torch.Tensor
        ``[batch, K, V]`` student log-probabilities for the same positions.

    Returns
    -------
    torch.Tensor
        ``[batch, K]``; zero at padding positions (where the teacher triple is all zero).

    Example
    -------
    >>> student = torch.tensor([[[0.5, 0.25, 0.25]]]).log()
    >>> full = topk_from_log_probs(torch.tensor([[[0.6, 0.3, 0.1]]]).log(), k=3)
    >>> top1 = topk_from_log_probs(torch.tensor([[[0.6, 0.3, 0.1]]]).log(), k=1)
    >>> from math import log
    >>> kl_full = 0.6 * log(0.6 / 0.5) + 0.3 * log(0.3 / 0.25) + 0.1 * log(0.1 / 0.25)
    >>> torch.allclose(kl_divergence(full, student), torch.tensor(kl_full))
    True
    >>> bool(kl_divergence(top1, student) <= kl_divergence(full, student))
    True
    """
    student_log_probs = student_log_probs.float()
    q = dist.top_probs.float().detach()
    ids = dist.top_ids.long()
    r = dist.residual.float().detach()
    student_top = student_log_probs.gather(-1, ids)
    top_term = torch.where(q > 0, q * (torch.log(q.clamp_min(1e-30)) - student_top), 0.0)
    kl = top_term.sum(-1)
    vocab_size = student_log_probs.shape[-1]
    if ids.shape[-1] < vocab_size:
        # log P_rest by a logsumexp over the non-top-k ids (stable even when P_rest ~ 0).
        rest_log_probs = student_log_probs.scatter(-1, ids, float("-inf"))
        log_p_rest = torch.logsumexp(rest_log_probs, dim=-1)
        tail = r * (torch.log(r.clamp_min(1e-30)) - log_p_rest)
        kl = kl + torch.where(r > 0, tail, 0.0)
    return kl


class Teacher(torch.nn.Module):
    """A frozen language model over a unit vocabulary.

    Subclasses implement :meth:`unit_logits`; this class turns logits into probabilities at a
    temperature, the top-k triple, and the description the cache header records.

    Arguments
    ---------
    vocab_size : int
        Number of units ``V``; distributions are over ``0..V-1``.
    name : str
        What the teacher is (class and source), recorded in cache headers.
    context : str
        ``"causal"`` (``q_k = P(y_k | y_<k)``) or ``"bidirectional"`` (``P(y_k | y_{!=k})``).
    unit_type : str, optional
        ``"senone"``, ``"monophone"``, ``"subword"`` or any label the user chooses.
    tokenizer_hash : str, optional
        Hash of the tokenizer / lexicon / tree that defines the unit ids, so that a cache
        built with other units is refused.
    excluded_units : sequence of int, optional
        Unit ids that never get probability (e.g. an LM's special tokens when the units are
        its own token ids).
    """

    def __init__(
        self,
        vocab_size,
        name,
        context=CAUSAL,
        unit_type=None,
        tokenizer_hash=None,
        excluded_units=(),
    ):
        super().__init__()
        if context not in (CAUSAL, BIDIRECTIONAL):
            raise ValueError(f"context must be {CAUSAL!r} or {BIDIRECTIONAL!r}, got {context!r}")
        self.vocab_size = int(vocab_size)
        self.name = name
        self.context = context
        self.unit_type = unit_type
        self.tokenizer_hash = tokenizer_hash
        excluded = torch.zeros(self.vocab_size, dtype=torch.bool)
        # Special tokens past the unit range (e.g. added tokens) are already outside it.
        excluded[[int(u) for u in excluded_units if 0 <= int(u) < self.vocab_size]] = True
        self.register_buffer("excluded", excluded, persistent=False)

    def train(self, mode=True):
        """Teachers stay in eval mode (no dropout) whatever the Brain around them asks."""
        return super().train(False)

    @property
    def device(self):
        """The device of the teacher's parameters or buffers."""
        return self.excluded.device

    def unit_logits(self, unit_ids, lengths):
        """Logits ``[batch, K, vocab_size]``; position ``k`` scores the unit at ``k``.

        Arguments
        ---------
        unit_ids : torch.Tensor
            int64 ``[batch, K]``, unit ids, no BOS (see the module docstring).
        lengths : torch.Tensor
            ``[batch]``, relative (floating) or absolute (integer) lengths.
        """
        raise NotImplementedError

    def log_probs(self, unit_ids, lengths, tau=1.0):
        """Log-probabilities ``[batch, K, vocab_size]`` at temperature ``tau``, float32."""
        self._check_ids(unit_ids)
        with torch.no_grad():
            logits = self.unit_logits(unit_ids, lengths).float()
            logits = logits.masked_fill(self.excluded, float("-inf"))
            return torch.log_softmax(logits / tau, dim=-1)

    def forward(self, unit_ids, lengths, tau=1.0):
        """Probabilities ``[batch, K, vocab_size]`` at temperature ``tau``."""
        return self.log_probs(unit_ids, lengths, tau).exp()

    def distributions(self, unit_ids, lengths, k, tau=1.0):
        """The top-k triple (:class:`TopKDistributions`), padding positions zeroed."""
        log_probs = self.log_probs(unit_ids, lengths, tau)
        mask = lengths_to_mask(lengths, unit_ids.shape[1])
        return topk_from_log_probs(log_probs, k, mask.to(log_probs.device))

    def describe(self):
        """What a cache header records about this teacher."""
        return {
            "name": self.name,
            "context": self.context,
            "unit_type": self.unit_type,
            "vocab_size": self.vocab_size,
            "tokenizer_hash": self.tokenizer_hash,
        }

    def _check_ids(self, unit_ids):
        if unit_ids.dtype not in (torch.int64, torch.int32) or unit_ids.dim() != 2:
            raise ValueError(
                f"{self.name}: unit_ids must be an integer tensor [batch, K], got "
                f"{unit_ids.dtype} {tuple(unit_ids.shape)}"
            )


def shift_right(unit_ids, bos_index):
    """``[BOS, y_1, ..., y_{K-1}]``: the causal LM input whose output ``k`` predicts ``y_k``.

    Example
    -------
    >>> shift_right(torch.tensor([[5, 6, 7]]), bos_index=1)
    tensor([[1, 5, 6]])
    """
    bos = torch.full_like(unit_ids[:, :1], bos_index)
    return torch.cat([bos, unit_ids[:, :-1]], dim=1)
