"""CTC forced alignment of a batch: which token of the target sequence each frame emits.

A CTC model emits each token on a few frames and blank elsewhere. The best (Viterbi) path
through the CTC trellis of a known target sequence says, for every frame, whether it emits
blank or token ``k`` of the sequence; :func:`ctc_frame_positions` returns that as a
``frame_to_position`` alignment (``-1`` on blank frames), the format the losses of
:mod:`sb_crossmodal_kd.losses` take.

Two implementations give the same path:

* ``backend="viterbi"``: the whole batch at once, in torch on the tensors' own device. The
  recursion loops over frames in Python (a few kernels per frame, for all utterances
  together) and never reads a value back to the host: what a training step on a GPU wants.
* ``backend="torchaudio"``: ``torchaudio.functional.forced_align``, one utterance at a time
  (it accepts batch size 1 only, and reads lengths and targets on the host). On the CPU its
  compiled loop is several times faster than the Python one.

``backend="auto"`` (default) takes ``torchaudio`` on the CPU and ``viterbi`` elsewhere.

Lengths follow SpeechBrain's convention (relative, rounded as ``speechbrain.nnet.losses.ctc_loss``
rounds them), so the alignment covers the frames and tokens the CTC loss sees. An utterance
that no CTC path can align (fewer frames than tokens plus repeated neighbours) gets ``-1`` on
every frame.

Example
-------
>>> import torch
>>> # blank = 0; frames say blank, blank, A(1), blank, blank, B(2), blank
>>> peaks = torch.tensor([0, 0, 1, 0, 0, 2, 0])
>>> log_probs = torch.log_softmax(8.0 * torch.nn.functional.one_hot(peaks, 3).float(), -1)
>>> ctc_frame_positions(log_probs[None], torch.tensor([[1, 2]]), blank_index=0)
tensor([[-1, -1,  0, -1, -1,  1, -1]])
"""

import torch

from sb_crossmodal_kd.lengths import absolute_lengths

__all__ = ["ctc_frame_positions", "ctc_alignable"]

BACKENDS = ("auto", "viterbi", "torchaudio")


def _counts(lengths, size, batch, device):
    """Absolute lengths from SpeechBrain relative ones (full length when None)."""
    if lengths is None:
        return torch.full((batch,), size, dtype=torch.long, device=device)
    return absolute_lengths(lengths.to(device), size).clamp(0, size)


def _padded_tokens(tokens, n_tokens, blank_index):
    """Tokens as int64 with positions past each utterance's length set to the blank."""
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    valid = positions[None, :] < n_tokens[:, None]
    return torch.where(valid, tokens.long(), torch.full_like(tokens, blank_index, dtype=torch.long))


def ctc_alignable(tokens, n_frames, n_tokens, blank_index):
    """Whether a CTC path exists: ``n_frames >= n_tokens + repeats`` (``[B]`` bool).

    A token equal to its predecessor needs a blank frame between them, so each repeat
    costs one frame more.

    Arguments
    ---------
    tokens : torch.Tensor
        ``[B, L]`` int target sequences (no blank among the first ``n_tokens``).
    n_frames : torch.Tensor
        ``[B]`` int frames per utterance.
    n_tokens : torch.Tensor
        ``[B]`` int tokens per utterance.
    blank_index : int
        The CTC blank.

    Example
    -------
    >>> ctc_alignable(torch.tensor([[1, 1, 1], [1, 2, 3]]), torch.tensor([4, 3]),
    ...               torch.tensor([3, 3]), blank_index=0)
    tensor([False,  True])
    """
    padded = _padded_tokens(tokens, n_tokens, blank_index)
    repeats = ((padded[:, 1:] == padded[:, :-1]) & (padded[:, 1:] != blank_index)).sum(1)
    return n_frames >= n_tokens + repeats


def _viterbi_states(log_probs, tokens, n_frames, n_tokens, blank_index):
    """Best CTC path as trellis states ``[B, T]`` (state ``2k + 1`` is token ``k``, even
    states are blanks) and whether it has a finite score ``[B]``."""
    batch, n_time, _ = log_probs.shape
    device = log_probs.device
    n_states = 2 * tokens.shape[1] + 1
    padded = _padded_tokens(tokens, n_tokens, blank_index)
    extended = torch.full((batch, n_states), blank_index, dtype=torch.long, device=device)
    extended[:, 1::2] = padded
    states = torch.arange(n_states, device=device)
    in_sequence = states[None, :] < (2 * n_tokens + 1)[:, None]
    # Skipping the blank between tokens k-1 and k is allowed unless they are equal.
    skip = torch.zeros(batch, n_states, dtype=torch.bool, device=device)
    skip[:, 3::2] = padded[:, 1:] != padded[:, :-1]
    neg_inf = torch.tensor(float("-inf"), dtype=log_probs.dtype, device=device)
    skip_penalty = torch.where(skip, torch.zeros_like(neg_inf), neg_inf)
    emissions = log_probs.gather(2, extended[:, None, :].expand(batch, n_time, n_states))
    emissions = torch.where(in_sequence[:, None, :], emissions, neg_inf)
    live = torch.arange(n_time, device=device)[:, None, None] < n_frames[None, :, None]

    # alpha with two leading -inf columns, so predecessors s-1 and s-2 are plain slices
    alpha = torch.full((batch, n_states + 2), float("-inf"), dtype=log_probs.dtype,
                       device=device)
    alpha[:, 2:4] = emissions[:, 0, :2]  # a path starts on the first blank or first token
    backpointers = torch.zeros(n_time, batch, n_states, dtype=torch.uint8, device=device)
    for t in range(1, n_time):
        candidates = torch.stack(
            [alpha[:, 2:], alpha[:, 1:-1], alpha[:, :-2] + skip_penalty], dim=-1)
        best, step = candidates.max(dim=-1)
        # Frames past an utterance's length keep its scores and stay in place.
        alpha[:, 2:] = torch.where(live[t], best + emissions[:, t], alpha[:, 2:])
        backpointers[t] = torch.where(live[t], step, torch.zeros_like(step)).to(torch.uint8)

    # A path ends on the last token or the blank after it.
    last = 2 * n_tokens  # the final blank's state
    final = alpha[:, 2:]
    end_blank = final.gather(1, last[:, None]).squeeze(1)
    end_token = final.gather(1, (last - 1).clamp(min=0)[:, None]).squeeze(1)
    use_token = (n_tokens > 0) & (end_token > end_blank)
    state = torch.where(use_token, last - 1, last)
    score = torch.where(use_token, end_token, end_blank)
    path = torch.empty(batch, n_time, dtype=torch.long, device=device)
    for t in range(n_time - 1, -1, -1):
        path[:, t] = state
        if t:
            state = state - backpointers[t].gather(1, state[:, None]).squeeze(1).long()
    return path, torch.isfinite(score)


def _torchaudio_states(log_probs, tokens, n_frames, n_tokens, blank_index, alignable):
    """The same states from ``torchaudio.functional.forced_align``, one utterance a call."""
    import warnings

    from torchaudio.functional import forced_align

    batch, n_time, _ = log_probs.shape
    labels = torch.full((batch, n_time), blank_index, dtype=torch.long, device=log_probs.device)
    # forced_align takes one utterance cut to its own lengths: these are read on the host.
    for b, (frames, count, ok) in enumerate(
        zip(n_frames.tolist(), n_tokens.tolist(), alignable.tolist(), strict=True)
    ):
        if ok and count > 0:
            with warnings.catch_warnings():  # deprecated, still in the pinned torchaudio 2.9
                warnings.filterwarnings("ignore", message=".*forced_align has been deprecated")
                path, _ = forced_align(log_probs[b : b + 1, :frames],
                                       tokens[b : b + 1, :count].long(), blank=blank_index)
            labels[b, :frames] = path[0].to(labels.device)
    # A token starts where a non-blank label differs from the previous frame's label (two
    # equal tokens in a row always have a blank between them on a CTC path).
    previous = torch.cat([labels.new_full((batch, 1), blank_index), labels[:, :-1]], dim=1)
    starts = (labels != blank_index) & (labels != previous)
    position = torch.cumsum(starts.long(), dim=1) - 1
    return torch.where(labels != blank_index, 2 * position + 1, torch.zeros_like(position))


@torch.no_grad()
def ctc_frame_positions(
    log_probs, tokens, frame_lens=None, token_lens=None, blank_index=0, backend="auto"
):
    """The frame-to-token alignment of the best CTC path of ``tokens`` (``-1`` on blanks).

    Arguments
    ---------
    log_probs : torch.Tensor
        ``[B, T, C]`` the CTC output's log-posteriors (or logits: the best path is the same,
        and they are log-softmaxed here). Detached: an alignment has no gradient.
    tokens : torch.Tensor
        ``[B, L]`` int target sequences, without blanks.
    frame_lens : torch.Tensor, optional
        ``[B]`` relative frame lengths (as given to the CTC loss); all ``T`` frames if None.
    token_lens : torch.Tensor, optional
        ``[B]`` relative token lengths; all ``L`` tokens if None.
    blank_index : int
        The CTC blank.
    backend : str
        ``viterbi`` (batched, on the device, no host reads), ``torchaudio``
        (``torchaudio.functional.forced_align`` per utterance) or ``auto`` (``torchaudio``
        on the CPU, else ``viterbi``).

    Returns
    -------
    torch.Tensor
        ``[B, T]`` int64: ``k`` on the frames where the path emits token ``k``, ``-1`` on
        blank frames, frames past ``frame_lens`` and every frame of an utterance that cannot
        be aligned.

    Example
    -------
    >>> import torch
    >>> log_probs = torch.log_softmax(torch.randn(2, 6, 4), -1)
    >>> positions = ctc_frame_positions(log_probs, torch.tensor([[1, 1, 2], [3, 2, 1]]),
    ...                                 frame_lens=torch.tensor([1.0, 0.5]), blank_index=0)
    >>> positions[1].tolist()  # 3 frames for 3 distinct tokens: one path only
    [0, 1, 2, -1, -1, -1]
    >>> positions[0][positions[0] >= 0].unique().tolist()  # every token, in order
    [0, 1, 2]
    """
    if backend not in BACKENDS:
        raise ValueError(f"ctc_frame_positions: backend '{backend}' is not one of {BACKENDS}.")
    if log_probs.dim() != 3 or tokens.dim() != 2 or tokens.shape[0] != log_probs.shape[0]:
        raise ValueError(
            f"ctc_frame_positions: log_probs {tuple(log_probs.shape)} and tokens "
            f"{tuple(tokens.shape)} must be [B, T, C] and [B, L] with the same B."
        )
    batch, n_time, _ = log_probs.shape
    device = log_probs.device
    if n_time == 0:
        return torch.zeros(batch, 0, dtype=torch.long, device=device)
    log_probs = log_probs.detach()
    if log_probs.dtype != torch.float64:
        log_probs = log_probs.float()  # half-precision sums over many frames lose the path
    log_probs = torch.log_softmax(log_probs, dim=-1)
    tokens = tokens.to(device)
    n_frames = _counts(frame_lens, n_time, batch, device)
    n_tokens = _counts(token_lens, tokens.shape[1], batch, device)
    alignable = ctc_alignable(tokens, n_frames, n_tokens, blank_index)
    if backend == "auto":
        backend = "torchaudio" if device.type == "cpu" else "viterbi"
    if backend == "torchaudio":
        states = _torchaudio_states(log_probs, tokens, n_frames, n_tokens, blank_index,
                                    alignable)
    else:
        states, finite = _viterbi_states(log_probs, tokens, n_frames, n_tokens, blank_index)
        alignable = alignable & finite
    frames = torch.arange(n_time, device=device)
    keep = (states % 2 == 1) & alignable[:, None] & (frames[None, :] < n_frames[:, None])
    return torch.where(keep, (states - 1) // 2, torch.full_like(states, -1))
