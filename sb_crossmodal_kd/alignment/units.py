"""From one monophone alignment to every unit type's sequence and frame alignment.

The distillation losses need, per utterance and unit type, the unit sequence (as text gives
it: what the unit's LM sees) and ``frame_to_position``: for each *encoder* frame the position
of the unit it belongs to, ``-1`` where there is none (silence, or frames a unit does not
reach). Everything here derives them from a 10 ms phone alignment:

- *phones*: the lexicon's phone sequence (no silence); positions come straight from the
  alignment; frame labels are the phone index, silence (``0``) on silence frames.
- *senones*: ``tree.senones(phones)`` (3 per phone); each aligned phone is split into 3
  equal state segments (:func:`~sb_crossmodal_kd.units.senones.split_states`); silence frames
  have no position but carry the silence state senones (``0, 1, 2``) as frame labels.
- *subwords*: ``tokenizer.encode(text)``; each token is mapped to the characters it decodes
  to, hence to its word, and a word's aligned time span is shared out over its tokens in
  proportion to their characters. Silence frames are ``-1`` (no subword label).

10 ms labels go to the encoder rate with ``FrameRate.downsample`` (``"majority"`` or
``"centre"``).

Example
-------
>>> # "hi" spans 0.05-0.25 s and "you" 0.25-0.45 s; 40 ms frames are centred at 0, 0.04, ...
>>> words = [("hi", 0.05, 0.25), ("you", 0.25, 0.45)]
>>> subword_frame_positions("hi you", words, [(0, 2), (3, 6)], 13, 0.04).tolist()
[-1, -1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, -1]
"""

import numpy as np

from sb_crossmodal_kd.units.senones import STATES, split_states

UNIT_TYPES = ("phones", "senones", "subwords")


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


def unit_streams(
    phone_ids,
    feature_positions,
    n_frames,
    frame_rate,
    tree=None,
    tokenizer=None,
    text=None,
    word_times=None,
    mode="majority",
):
    """All unit types' streams for one utterance, ready for :class:`UnitStoreWriter`.

    Arguments
    ---------
    phone_ids : list of int
        Text phone sequence (indices of ``PHONES``, no silence).
    feature_positions : array-like of int
        Position in ``phone_ids`` per 10 ms feature frame, ``-1`` for silence.
    n_frames : int
        Encoder frames of the utterance (``frame_rate.frames_for_samples(n_samples)``).
    frame_rate : FrameRate
    tree : SenoneTree, optional
        Adds the ``senones.*`` streams.
    tokenizer : object with ``encode``/``decode``, optional
        Adds the ``subwords.*`` streams (needs ``text`` and ``word_times``).
    text : str, optional
    word_times : list of (word, start_s, end_s), optional
    mode : str
        ``"majority"`` or ``"centre"`` (see :meth:`FrameRate.downsample`).

    Returns
    -------
    dict
        Stream name -> ``int32`` array.
    """
    from sb_crossmodal_kd.units.phones import PHONES

    feature_positions = np.asarray(feature_positions, dtype=np.int64)
    phone_ids = np.asarray(phone_ids, dtype=np.int64)
    streams = {"feature_positions": feature_positions.astype(np.int32)}

    positions = frame_rate.downsample(feature_positions, mode, n_frames)
    streams["phones.units"] = phone_ids.astype(np.int32)
    streams["phones.frame_to_position"] = positions
    streams["phones.frame_labels"] = np.where(
        positions >= 0, phone_ids[np.maximum(positions, 0)] if len(phone_ids) else 0, 0
    ).astype(np.int32)

    if tree is not None:
        phones = [PHONES[i] for i in phone_ids]
        units = np.asarray(tree.senones(phones), dtype=np.int64)
        _, state_positions = tree.frame_senones(phones, feature_positions)
        # Silence frames: the silence states, split over each silence run like a phone.
        silence_labels = np.full(len(feature_positions), -1, dtype=np.int64)
        is_sil = feature_positions < 0
        change = np.flatnonzero(np.diff(is_sil.astype(np.int8))) + 1
        for a, b in zip(np.r_[0, change], np.r_[change, len(is_sil)], strict=True):
            if b > a and is_sil[a]:
                silence_labels[a:b] = split_states(a, b, STATES)  # silence senones are 0, 1, 2
        senone_positions = frame_rate.downsample(state_positions, mode, n_frames)
        silence_frames = frame_rate.downsample(silence_labels, mode, n_frames)
        streams["senones.units"] = units.astype(np.int32)
        streams["senones.frame_to_position"] = senone_positions
        streams["senones.frame_labels"] = np.where(
            senone_positions >= 0,
            units[np.maximum(senone_positions, 0)] if len(units) else -1,
            np.maximum(silence_frames, 0),
        ).astype(np.int32)

    if tokenizer is not None:
        if text is None or word_times is None:
            raise ValueError("unit_streams: subwords need text and word_times")
        ids = list(tokenizer.encode(text))
        decoded = tokenizer.decode(ids)
        spans = token_char_spans(tokenizer, ids)
        sub_positions = subword_frame_positions(
            decoded, word_times, spans, n_frames, frame_rate.encoder_shift_s
        )
        streams["subwords.units"] = np.asarray(ids, dtype=np.int32)
        streams["subwords.frame_to_position"] = sub_positions
        id_array = np.asarray(ids, dtype=np.int64)
        streams["subwords.frame_labels"] = np.where(
            sub_positions >= 0, id_array[np.maximum(sub_positions, 0)] if ids else -1, -1
        ).astype(np.int32)
    return streams
