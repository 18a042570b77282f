"""The forced aligner's state sequence: a transcript as phone states, and state paths as classes.

A transcript becomes a :class:`TokenSequence`: its words' phones (from the lexicon) with an
optional silence at each edge and between words. Each token has states (classes
``phone * states_per_phone + state``, :func:`state_tokens`), through which the Viterbi
alignment passes left to right; :func:`state_labels` turns a path of token positions (and
states) into the frame classes that the phone model is trained on.

Example
-------
>>> from sb_crossmodal_kd.units.lexicon import Lexicon
>>> lexicon = Lexicon({"hi": [["HH", "AY1"]], "you": [["Y", "UW1"]]})
>>> sequence = token_sequence(lexicon, "hi you", "u1")
>>> [PHONES[t] for t in sequence.tokens], sequence.optional[:3], sequence.word_of
(['sil', 'HH', 'AY', 'sil', 'Y', 'UW', 'sil'], [True, False, False], [-1, 0, 0, -1, 1, 1, -1])
>>> state_labels([0, 0, 0, 1, 1, 1, 1, 1, 1, 2], [[0, 1, 2], [15, 16, 17], [1]]).tolist()
[0, 1, 2, 15, 15, 16, 16, 17, 17, 1]
"""

from typing import NamedTuple

import numpy as np

from sb_crossmodal_kd.units.phones import PHONES, SILENCE_INDEX
from sb_crossmodal_kd.units.senones import split_states


class TokenSequence(NamedTuple):
    """One utterance's tokens for alignment, one entry per token in each list but ``phones``.

    Attributes
    ----------
    tokens : list of int
        Phone indices (:data:`PHONES`), silences included.
    optional : list of bool
        Tokens the alignment may skip: the silences.
    word_of : list of int
        Word index of each token, ``-1`` for silence.
    text_positions : list of int
        Position in ``phones`` of each token, ``-1`` for silence.
    phones : list of str
        The utterance's phone sequence as the text gives it (no silence).
    """

    tokens: list
    optional: list
    word_of: list
    text_positions: list
    phones: list


def token_sequence(lexicon, words, utterance_id):
    """Phones with optional silences at the edges and between words, and word spans.

    Arguments
    ---------
    lexicon : Lexicon
        Words to phones (its OOV policy applies).
    words : str or list of str
    utterance_id : str
        Named in errors.

    Returns
    -------
    TokenSequence
    """
    per_word = lexicon.word_phones(words, utterance_id)
    tokens, optional, word_of, text_pos = [SILENCE_INDEX], [True], [-1], [-1]
    position = 0
    for w, phones in enumerate(per_word):
        if w > 0:
            tokens.append(SILENCE_INDEX)
            optional.append(True)
            word_of.append(-1)
            text_pos.append(-1)
        for p in phones:
            tokens.append(PHONES.index(p))
            optional.append(False)
            word_of.append(w)
            text_pos.append(position)
            position += 1
    tokens.append(SILENCE_INDEX)
    optional.append(True)
    word_of.append(-1)
    text_pos.append(-1)
    phones = [p for ph in per_word for p in ph]
    return TokenSequence(tokens, optional, word_of, text_pos, phones)


def state_tokens(tokens, states_per_phone, pause_states):
    """Classes ``phone * states_per_phone + state`` of each token's states, in order.

    A silence between words (not at the edges) has ``pause_states`` of the silence's
    states (one: its centre state, HTK's short pause; two: the first and last).

    Example
    -------
    >>> state_tokens([0, 5, 0, 7, 0], states_per_phone=3, pause_states=1)
    [[0, 1, 2], [15, 16, 17], [1], [21, 22, 23], [0, 1, 2]]
    """
    n_states = states_per_phone
    classes = [[p * n_states + j for j in range(n_states)] for p in tokens]
    pause = [
        SILENCE_INDEX * n_states + int(j)
        for j in split_states(0, min(pause_states, n_states), n_states)
    ]
    for k in range(1, len(tokens) - 1):
        if tokens[k] == SILENCE_INDEX:
            classes[k] = pause
    return classes


def state_labels(positions, state_tokens, substates=None):
    """Class per frame: the class of its token's state (see :func:`state_tokens`).

    Without ``substates``, each run of one token position is split into equal parts.

    Example
    -------
    >>> state_labels([0, 0, 1, 1, 1, 2], [[0, 1, 2], [15, 16, 17], [1]], [0, 2, 0, 1, 2, 0]).tolist()
    [0, 2, 15, 16, 17, 1]
    """
    positions = np.asarray(positions)
    n_states = np.array([len(classes) for classes in state_tokens])
    if substates is None:
        substates = np.zeros(len(positions), dtype=np.int64)
        change = np.flatnonzero(np.diff(positions)) + 1
        for a, b in zip(np.r_[0, change], np.r_[change, len(positions)], strict=True):
            substates[a:b] = split_states(a, b, n_states[positions[a]])
    first_state = np.concatenate([[0], np.cumsum(n_states)[:-1]])
    return np.concatenate(state_tokens)[first_state[positions] + np.asarray(substates)]
