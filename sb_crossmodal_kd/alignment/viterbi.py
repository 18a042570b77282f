"""Viterbi forced alignment of a known token sequence on frame log-probabilities.

Each token ``k`` of the sequence (a phone) becomes a left-to-right chain of
``min_duration[k]`` states, the last of which may repeat, so the token lasts at least
``min_duration[k]`` frames. Tokens marked optional (silence between words) may be skipped
entirely. Every frame gets the position of exactly one token: a full segmentation.

The recursion runs over frames in Python and is vectorised over all states of the sequence
(one ``argmax`` over three candidate predecessors per frame, in numpy on the CPU), so an
utterance of ``T`` frames and ``S`` states costs ``O(T * S)`` array work in ``T`` small steps.

Example
-------
>>> import torch
>>> # 3 classes; frames clearly say 1, 1, 0, 0, 2, 2 (class 0 = silence).
>>> frames = torch.tensor([1, 1, 0, 0, 2, 2])
>>> log_probs = torch.log_softmax(5.0 * torch.nn.functional.one_hot(frames, 3).float(), -1)
>>> viterbi_align(log_probs, [1, 0, 2], optional=[False, True, False]).tolist()
[0, 0, 1, 1, 2, 2]
>>> viterbi_align(log_probs, [1, 0, 2], optional=[False, True, False], min_duration=3).tolist()
[0, 0, 0, 2, 2, 2]
"""

import numpy as np
import torch


class AlignmentError(ValueError):
    """The token sequence cannot be aligned to the frames (too few frames)."""


def viterbi_align(log_probs, tokens, min_duration=1, optional=None, utterance_id=None):
    """Best segmentation of ``log_probs`` into ``tokens`` (in order).

    Arguments
    ---------
    log_probs : torch.Tensor
        Frame log-probabilities (log-posteriors or scaled log-likelihoods), shape ``(T, C)``.
    tokens : list of int or torch.Tensor
        Token class ids, length ``K``.
    min_duration : int or list of int
        Minimum frames per token (shared, or one per token; ``>= 1``). An optional token that
        is skipped takes no frames.
    optional : list of bool, optional
        Tokens that may be skipped (default: none).
    utterance_id : str, optional
        Named in errors.

    Returns
    -------
    torch.Tensor
        Long tensor ``(T,)``: the position ``k`` in ``tokens`` of each frame (never ``-1``).
    """
    device = log_probs.device
    tokens = torch.as_tensor(tokens, dtype=torch.long, device=device)
    n_frames, n_tokens = log_probs.shape[0], tokens.numel()
    where = f"utterance {utterance_id!r}: " if utterance_id is not None else ""
    if n_tokens == 0:
        raise AlignmentError(f"{where}no tokens to align")
    min_dur = torch.as_tensor(min_duration, dtype=torch.long, device=device).expand(n_tokens)
    if bool((min_dur < 1).any()):
        raise ValueError(f"{where}min_duration must be >= 1")
    opt = torch.zeros(n_tokens, dtype=torch.bool, device=device)
    if optional is not None:
        opt = torch.as_tensor(optional, dtype=torch.bool, device=device)
        if opt.numel() != n_tokens:
            raise ValueError(f"{where}optional has {opt.numel()} flags for {n_tokens} tokens")
    needed = int(min_dur[~opt].sum())
    if needed > n_frames:
        raise AlignmentError(
            f"{where}{n_tokens} tokens need at least {needed} frames but there are only "
            f"{n_frames}; the transcript may not belong to this audio, or lower min_duration"
        )

    # Expand tokens into states: state s belongs to token state_token[s].
    state_token = torch.repeat_interleave(torch.arange(n_tokens, device=device), min_dur)
    n_states = state_token.numel()
    first = torch.cumsum(min_dur, 0) - min_dur  # first state of each token
    last = first + min_dur - 1
    is_last = torch.zeros(n_states, dtype=torch.bool, device=device)
    is_last[last] = True
    # A token's first state may also be entered from the last state of the token two back
    # when the token in between is optional (skip).
    skip_into = torch.zeros(n_states, dtype=torch.bool, device=device)
    skip_from = torch.full((n_states,), -1, dtype=torch.long, device=device)
    if n_tokens > 2:
        k = torch.arange(2, n_tokens, device=device)
        ok = opt[k - 1]
        skip_into[first[k[ok]]] = True
        skip_from[first[k[ok]]] = last[k[ok] - 2]

    # The recursion runs in numpy on the CPU: T small steps over S states are much cheaper
    # there than as T rounds of tiny device kernels.
    emit = log_probs.detach().index_select(1, tokens[state_token]).double().cpu().numpy()
    is_last_np = is_last.cpu().numpy()
    skip_into_np = skip_into.cpu().numpy()
    skip_from_np = skip_from.clamp(min=0).cpu().numpy()
    neg = -1e30
    score = np.full(n_states, neg)
    score[0] = emit[0, 0]
    if bool(opt[0]) and n_tokens > 1:
        start = int(first[1])
        score[start] = emit[0, start]
    back = np.zeros((n_frames, n_states), dtype=np.int8)  # 0 stay, 1 advance, 2 skip
    candidates = np.empty((3, n_states))
    for t in range(1, n_frames):
        candidates[0] = np.where(is_last_np, score, neg)
        candidates[1, 0] = neg
        candidates[1, 1:] = score[:-1]
        candidates[2] = np.where(skip_into_np, score[skip_from_np], neg)
        choice = candidates.argmax(0)
        back[t] = choice
        score = candidates[choice, np.arange(n_states)] + emit[t]

    end_states = [int(last[-1])]
    if bool(opt[-1]) and n_tokens > 1:
        end_states.append(int(last[-2]))
    end_scores = score[end_states]
    if end_scores.max() <= neg / 2:
        raise AlignmentError(f"{where}no path through all tokens in {n_frames} frames")
    state = end_states[int(end_scores.argmax())]

    path = np.empty(n_frames, dtype=np.int64)
    for t in range(n_frames - 1, -1, -1):
        path[t] = state
        move = back[t, state]
        state = state if move == 0 else state - 1 if move == 1 else int(skip_from_np[state])
    return state_token[torch.from_numpy(path).to(device)]


def segments(positions):
    """Runs of equal positions: list of ``(position, start_frame, end_frame)``.

    Example
    -------
    >>> segments(torch.tensor([0, 0, 1, 2, 2, 2]))
    [(0, 0, 2), (1, 2, 3), (2, 3, 6)]
    """
    positions = torch.as_tensor(positions).cpu()
    if positions.numel() == 0:
        return []
    change = torch.nonzero(positions[1:] != positions[:-1]).flatten() + 1
    starts = [0] + change.tolist()
    ends = change.tolist() + [positions.numel()]
    return [(int(positions[s]), s, e) for s, e in zip(starts, ends, strict=True)]
