"""Decoding one utterance: the Viterbi state path through its phones, and its timed segments.

:func:`state_path` runs :func:`~sb_crossmodal_kd.alignment.viterbi.viterbi_align` on the
phone model's scaled log-likelihoods through the utterance's
:class:`~sb_crossmodal_kd.alignment.phone_states.TokenSequence`, every phone passing through
its states; :func:`alignment_from_path` turns the path into a :class:`PhoneAlignment`: the
phone position and label of every 10 ms feature frame, and word and phone times.

Example
-------
>>> from sb_crossmodal_kd.alignment.phone_states import token_sequence
>>> from sb_crossmodal_kd.units.lexicon import Lexicon
>>> sequence = token_sequence(Lexicon({"hi": [["HH", "AY1"]]}), "hi", "u1")
>>> import torch
>>> from sb_crossmodal_kd.units.phones import PHONES
>>> frames = [PHONES.index(p) for p in ["sil", "HH", "HH", "AY", "sil"]]
>>> scores = (5.0 * torch.nn.functional.one_hot(torch.tensor(frames), len(PHONES))).log_softmax(-1)
>>> from sb_crossmodal_kd.alignment.forced import AlignerSettings
>>> settings = AlignerSettings(states_per_phone=1)  # one state per phone
>>> positions, _ = state_path(scores, sequence, settings, "u1")
>>> alignment = alignment_from_path(positions.numpy(), sequence, "hi", "u1", 0.01)
>>> alignment.feature_positions.tolist(), alignment.words == [("hi", 0.005, 0.035)]
([-1, 0, 0, 1, -1], True)
"""

from dataclasses import dataclass

import numpy as np

from sb_crossmodal_kd.alignment.phone_states import state_tokens
from sb_crossmodal_kd.alignment.viterbi import viterbi_align
from sb_crossmodal_kd.units.phones import PHONES


@dataclass
class PhoneAlignment:
    """One utterance's forced alignment at the 10 ms feature rate.

    Attributes
    ----------
    utterance_id : str
    phones : list of str
        The utterance's phone sequence as text gives it (no silence).
    feature_positions : numpy.ndarray
        Position in ``phones`` of each feature frame, ``-1`` for silence.
    feature_labels : numpy.ndarray
        Phone index (:data:`PHONES`) of each feature frame, ``0`` for silence.
    words : list of (word, start_s, end_s)
    phone_segments : list of (phone, start_s, end_s)
        Including the silences that the alignment kept.
    """

    utterance_id: str
    phones: list
    feature_positions: np.ndarray
    feature_labels: np.ndarray
    words: list
    phone_segments: list


def state_path(log_likelihoods, sequence, settings, utterance_id):
    """Token position and state per frame: the best path through ``sequence``'s states.

    Arguments
    ---------
    log_likelihoods : torch.Tensor
        ``(T, n_phones * states_per_phone)`` scores of the frames.
    sequence : TokenSequence
    settings : AlignerSettings
        Its ``states_per_phone``, ``pause_states`` and ``min_duration`` (frames per state).
    utterance_id : str
        Named in errors.

    Returns
    -------
    positions, substates : torch.Tensor
        ``(T,)`` each: the position in ``sequence.tokens`` and the state of every frame.
    """
    return viterbi_align(
        log_likelihoods,
        state_tokens(sequence.tokens, settings.states_per_phone, settings.pause_states),
        min_duration=settings.min_duration,
        optional=sequence.optional,
        utterance_id=utterance_id,
        return_substates=True,
    )


def alignment_from_path(path, sequence, words, utterance_id, feature_shift_s):
    """The :class:`PhoneAlignment` of a path of token positions (see :func:`state_path`).

    Arguments
    ---------
    path : numpy.ndarray
        Position in ``sequence.tokens`` of each feature frame.
    sequence : TokenSequence
    words : str or list of str
        The words ``sequence`` was made from.
    utterance_id : str
    feature_shift_s : float
        Seconds between feature frames.
    """
    tokens, _, word_of, text_pos, phones = sequence
    tokens_arr, text_pos_arr = np.asarray(tokens), np.asarray(text_pos)
    positions = text_pos_arr[path]
    labels = tokens_arr[path]
    # Segments: runs of one token position; frame j spans [(j - 0.5) * shift, (j + 0.5) * shift)
    # since Fbank frames are centred on j * shift (shift: feature_shift_s); clip at 0.
    change = np.flatnonzero(np.diff(path)) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [len(path)]])
    phone_segments, word_spans = [], {}
    word_list = words.split() if isinstance(words, str) else list(words)
    for a, b in zip(starts, ends, strict=True):
        k = int(path[a])
        t0, t1 = max(0.0, (a - 0.5) * feature_shift_s), (b - 0.5) * feature_shift_s
        phone_segments.append((PHONES[tokens[k]], round(t0, 4), round(t1, 4)))
        w = word_of[k]
        if w >= 0:
            s0, s1 = word_spans.get(w, (t0, t1))
            word_spans[w] = (min(s0, t0), max(s1, t1))
    word_segments = [
        (word_list[w], round(word_spans[w][0], 4), round(word_spans[w][1], 4))
        for w in sorted(word_spans)
    ]
    return PhoneAlignment(
        utterance_id, phones, positions.astype(np.int32), labels.astype(np.int32),
        word_segments, phone_segments,
    )
