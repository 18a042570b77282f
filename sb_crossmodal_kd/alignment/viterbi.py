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


def viterbi_align(
    log_probs, tokens, min_duration=1, optional=None, utterance_id=None, return_substates=False
):
    """Best segmentation of ``log_probs`` into ``tokens`` (in order).

    Arguments
    ---------
    log_probs : torch.Tensor
        Frame log-probabilities (log-posteriors or scaled log-likelihoods), shape ``(T, C)``.
    tokens : list of int, torch.Tensor, or list of list of int
        Token class ids, length ``K``; or, for tokens with several sub-states (HMM states of a
        phone: begin, middle, end), one list of sub-state class ids per token, passed through
        left to right.
    min_duration : int or list of int
        Minimum frames per token, or per sub-state when tokens have sub-states (shared, or one
        per token; ``>= 1``). An optional token that is skipped takes no frames.
    optional : list of bool, optional
        Tokens that may be skipped (default: none).
    utterance_id : str, optional
        Named in errors.
    return_substates : bool
        Also return the sub-state index of each frame.

    Returns
    -------
    torch.Tensor
        Long tensor ``(T,)``: the position ``k`` in ``tokens`` of each frame (never ``-1``);
        with ``return_substates``, a second ``(T,)`` tensor of sub-state indices.

    Example
    -------
    >>> frames = torch.tensor([0, 1, 1, 2, 3, 3])  # classes of (token 0: 0 1 | token 1: 2 3)
    >>> log_probs = torch.log_softmax(5.0 * torch.nn.functional.one_hot(frames, 4).float(), -1)
    >>> pos, sub = viterbi_align(log_probs, [[0, 1], [2, 3]], return_substates=True)
    >>> pos.tolist(), sub.tolist()
    ([0, 0, 0, 1, 1, 1], [0, 1, 1, 0, 1, 1])
    """
    device = log_probs.device
    if torch.is_tensor(tokens):
        tokens = tokens.tolist()
    sub_states = [list(t) if isinstance(t, (list, tuple)) else [int(t)] for t in tokens]
    n_frames, n_tokens = log_probs.shape[0], len(sub_states)
    where = f"utterance {utterance_id!r}: " if utterance_id is not None else ""
    if n_tokens == 0 or any(len(t) == 0 for t in sub_states):
        raise AlignmentError(f"{where}no tokens (or a token without states) to align")
    min_dur = np.broadcast_to(np.asarray(min_duration, dtype=np.int64), (n_tokens,))
    if (min_dur < 1).any():
        raise ValueError(f"{where}min_duration must be >= 1")
    opt = np.zeros(n_tokens, dtype=bool)
    if optional is not None:
        opt = np.asarray(optional, dtype=bool)
        if opt.size != n_tokens:
            raise ValueError(f"{where}optional has {opt.size} flags for {n_tokens} tokens")
    per_token = np.array([len(t) for t in sub_states]) * min_dur
    needed = int(per_token[~opt].sum())
    if needed > n_frames:
        raise AlignmentError(
            f"{where}{n_tokens} tokens need at least {needed} frames but there are only "
            f"{n_frames}; the transcript may not belong to this audio, or lower min_duration"
        )

    # Expand tokens into HMM states: each sub-state is a chain of min_duration states with
    # the sub-state's class, the last of which may repeat.
    state_class, state_token, state_sub, self_loop = [], [], [], []
    for k, classes in enumerate(sub_states):
        for j, c in enumerate(classes):
            for d in range(min_dur[k]):
                state_class.append(c)
                state_token.append(k)
                state_sub.append(j)
                self_loop.append(d == min_dur[k] - 1)
    state_token = np.asarray(state_token)
    n_states = len(state_class)
    first = np.concatenate([[0], np.cumsum(per_token)[:-1]])  # first state of each token
    last = first + per_token - 1
    is_last = np.asarray(self_loop)
    # A token's first state may also be entered from the last state of the token two back
    # when the token in between is optional (skip).
    skip_into = np.zeros(n_states, dtype=bool)
    skip_from = np.zeros(n_states, dtype=np.int64)
    if n_tokens > 2:
        k = np.arange(2, n_tokens)[opt[1:-1]]
        skip_into[first[k]] = True
        skip_from[first[k]] = last[k - 2]

    # The recursion runs in numpy on the CPU: T small steps over S states are much cheaper
    # there than as T rounds of tiny device kernels.
    index = torch.as_tensor(state_class, dtype=torch.long, device=device)
    emit = log_probs.detach().index_select(1, index).double().cpu().numpy()
    neg = -1e30
    score = np.full(n_states, neg)
    score[0] = emit[0, 0]
    if opt[0] and n_tokens > 1:
        start = int(first[1])
        score[start] = emit[0, start]
    back = np.zeros((n_frames, n_states), dtype=np.int8)  # 0 stay, 1 advance, 2 skip
    candidates = np.empty((3, n_states))
    for t in range(1, n_frames):
        candidates[0] = np.where(is_last, score, neg)
        candidates[1, 0] = neg
        candidates[1, 1:] = score[:-1]
        candidates[2] = np.where(skip_into, score[skip_from], neg)
        choice = candidates.argmax(0)
        back[t] = choice
        score = candidates[choice, np.arange(n_states)] + emit[t]

    end_states = [int(last[-1])]
    if opt[-1] and n_tokens > 1:
        end_states.append(int(last[-2]))
    end_scores = score[end_states]
    if end_scores.max() <= neg / 2:
        raise AlignmentError(f"{where}no path through all tokens in {n_frames} frames")
    state = end_states[int(end_scores.argmax())]

    path = np.empty(n_frames, dtype=np.int64)
    for t in range(n_frames - 1, -1, -1):
        path[t] = state
        move = back[t, state]
        state = state if move == 0 else state - 1 if move == 1 else int(skip_from[state])
    positions = torch.from_numpy(state_token[path]).to(device)
    if return_substates:
        return positions, torch.from_numpy(np.asarray(state_sub)[path]).to(device)
    return positions


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
