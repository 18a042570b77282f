"""Time geometry of text units: which encoder frames a subword (or any piece of a word) covers.

The unit types (:mod:`sb_crossmodal_kd.units.types`) derive their frame alignments from a
10 ms phone alignment; units defined on text rather than phones (subwords, characters) are
placed by their words' aligned times: each token is mapped to the characters it decodes to,
hence to its word, and a word's time span is shared out over its tokens in proportion to their
characters.

Example
-------
>>> # "hi" spans 0.05-0.25 s and "you" 0.25-0.45 s; 40 ms frames are centred at 0, 0.04, ...
>>> words = [("hi", 0.05, 0.25), ("you", 0.25, 0.45)]
>>> subword_frame_positions("hi you", words, [(0, 2), (3, 6)], 13, 0.04).tolist()
[-1, -1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, -1]
"""

import numpy as np


def token_char_spans(tokenizer, ids):
    """``[start, end)`` character spans of each token in ``tokenizer.decode(ids)``.

    Uses prefix decoding, so it works for SentencePiece and transformers tokenizers alike;
    leading whitespace a token decodes to is not part of its span.
    """
    spans, previous = [], ""
    text = tokenizer.decode(ids)
    for i in range(len(ids)):
        prefix = tokenizer.decode(ids[: i + 1])
        start = len(previous)
        # Skip the whitespace that begins a new word.
        while start < len(prefix) and prefix[start] == " ":
            start += 1
        spans.append((start, len(prefix)))
        previous = prefix
    if previous != text:
        raise ValueError("token_char_spans: the tokenizer does not decode prefixes consistently")
    return spans


def subword_frame_positions(text, word_times, char_spans, n_frames, shift_s):
    """Encoder-frame positions of subword tokens from word times.

    Arguments
    ---------
    text : str
        The decoded text whose characters ``char_spans`` index (words separated by spaces).
    word_times : list of (word, start_s, end_s)
        Aligned words of ``text``, in order.
    char_spans : list of (start, end)
        Character span of each token in ``text``.
    n_frames : int
        Encoder frames of the utterance.
    shift_s : float
        Encoder frame shift; frame ``j`` is centred at ``j * shift_s``.

    Returns
    -------
    numpy.ndarray
        Token position per frame, ``-1`` where no token (silence).
    """
    words = text.split(" ")
    word_start_char, c = [], 0
    for w in words:
        word_start_char.append(c)
        c += len(w) + 1
    word_index = [i for i, w in enumerate(words) if w]
    if len(word_index) != len(word_times):
        raise ValueError(
            f"subword alignment: {len(word_index)} words in {text!r} but {len(word_times)} "
            "aligned words"
        )
    times = dict(zip(word_index, word_times, strict=True))
    positions = np.full(n_frames, -1, dtype=np.int32)
    for k, (a, b) in enumerate(char_spans):
        if b <= a:
            continue  # a token that is only whitespace covers no audio
        # The word holding this token's first character.
        w = max(i for i in word_index if word_start_char[i] <= a)
        _, t0, t1 = times[w]
        length = max(len(words[w]), 1)
        rel0 = (a - word_start_char[w]) / length
        rel1 = min((b - word_start_char[w]) / length, 1.0)
        s0, s1 = t0 + rel0 * (t1 - t0), t0 + rel1 * (t1 - t0)
        first = max(0, int(np.ceil(s0 / shift_s - 1e-9)))
        last = min(n_frames, int(np.ceil(s1 / shift_s - 1e-9)))
        positions[first:last] = k
    return positions
