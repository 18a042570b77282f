"""Kaldi alignments as monophone and senone frame labels at the model's frame rate.

Users with a Kaldi system can skip our aligner and tree: per-frame phone alignments
(``ali-to-phones --per-frame=true ... ark:-``) become the monophone labels, and per-frame pdf-id
alignments (``ali-to-pdf ... ark:-``) the senone labels (Kaldi's pdfs are its tied states).
Both are integer vectors per utterance in ark or scp files, read with ``kaldiio``.

Kaldi frames are 10 ms with a 25 ms window and ``snip-edges=true`` by default: frame ``i``
is centred at ``i * 10 + 12.5`` ms, while our feature frame ``j`` is centred at ``j * 10`` ms.
Each of our feature frames takes the Kaldi frame nearest its centre; the result is converted to
encoder frames by majority or centre frame (:meth:`FrameRate.downsample`).

Kaldi phone symbols are mapped to the 40-phone inventory through ``phones.txt``: word-position
suffixes (``_B``, ``_E``, ``_I``, ``_S``) and stress digits are removed, and the silence and
noise symbols (``SIL``, ``SPN``, ``NSN``, ``<eps>``, ...) become ``sil``.

Example
-------
>>> kaldi_to_feature_frames(np.array([5, 5, 6, 6, 6]), n_feature_frames=7).tolist()
[5, 5, 5, 6, 6, 6, 6]
"""

import hashlib

import kaldiio
import numpy as np

from sb_crossmodal_kd.alignment.framerate import FrameRate, fit_to_length
from sb_crossmodal_kd.units.phones import PHONES, SILENCE, SILENCE_INDEX, strip_stress

SILENCE_SYMBOLS = {"SIL", "SPN", "NSN", "SPOKEN_NOISE", "NOISE", "LAU", "<EPS>", "<UNK>", "SILENCE"}


def read_int_alignments(path):
    """Reads ``{utterance_id: int array}`` from a Kaldi ark or scp file.

    ``path`` ending in ``.scp`` is read as a script file (which may point into several arks).
    """
    path = str(path)
    try:
        if path.endswith(".scp"):
            table = kaldiio.load_scp(path)
            return {k: np.asarray(table[k]).astype(np.int64).reshape(-1) for k in table}
        return {k: np.asarray(v).astype(np.int64).reshape(-1) for k, v in kaldiio.load_ark(path)}
    except Exception as error:  # kaldiio raises assorted errors on malformed files
        raise ValueError(f"{path}: cannot read Kaldi integer alignments ({error})") from error


def read_phone_table(path):
    """Kaldi ``phones.txt`` -> ``{kaldi phone id: index in PHONES}``.

    Example
    -------
    >>> import pathlib
    >>> table = pathlib.Path(getfixture("tmp_path")) / "phones.txt"
    >>> _ = table.write_text("<eps> 0\\nSIL 1\\nAA1_B 2\\nK_E 3\\n")
    >>> read_phone_table(table)
    {0: 0, 1: 0, 2: 1, 3: 20}
    """
    mapping = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not parts[1].isdigit():
                raise ValueError(f"{path}:{line_no}: expected 'symbol id', got {line.strip()!r}")
            symbol, index = parts[0], int(parts[1])
            base = symbol.upper()
            if base.startswith("#"):
                continue  # disambiguation symbols never appear in alignments
            for suffix in ("_B", "_E", "_I", "_S"):
                if base.endswith(suffix):
                    base = base[: -len(suffix)]
            base = strip_stress(base)
            if base in SILENCE_SYMBOLS or base == SILENCE.upper():
                mapping[index] = SILENCE_INDEX
            elif base in PHONES:
                mapping[index] = PHONES.index(base)
            else:
                raise ValueError(
                    f"{path}:{line_no}: Kaldi phone {symbol!r} has no counterpart among the 39 "
                    "ARPAbet phones or silence; map it in phones.txt first"
                )
    return mapping


def kaldi_to_feature_frames(kaldi_labels, n_feature_frames, window_ms=25.0, hop_ms=10.0,
                            snip_edges=True):
    """Kaldi per-frame labels -> one label per Fbank frame (nearest Kaldi frame centre)."""
    kaldi_labels = np.asarray(kaldi_labels)
    offset = window_ms / (2 * hop_ms) if snip_edges else 0.0
    nearest = np.floor(np.arange(n_feature_frames) - offset + 0.5).astype(np.int64)
    return kaldi_labels[np.clip(nearest, 0, len(kaldi_labels) - 1)]


def _runs(labels):
    change = np.flatnonzero(np.diff(labels)) + 1
    starts = np.r_[0, change]
    return starts, np.r_[change, len(labels)]


def sequence_and_positions(labels, skip=None):
    """Run-length units of a frame labelling, and the run position of every frame.

    Frames whose label is ``skip`` (e.g. silence) get position ``-1`` and add no unit.

    Example
    -------
    >>> units, pos = sequence_and_positions(np.array([0, 3, 3, 5, 0, 0, 5]), skip=0)
    >>> units.tolist(), pos.tolist()
    ([3, 5, 5], [-1, 0, 0, 1, -1, -1, 2])
    """
    labels = np.asarray(labels)
    positions = np.full(len(labels), -1, dtype=np.int64)
    units = []
    for a, b in zip(*_runs(labels), strict=True):
        if skip is not None and labels[a] == skip:
            continue
        positions[a:b] = len(units)
        units.append(int(labels[a]))
    return np.asarray(units, dtype=np.int64), positions


def import_kaldi(
    phone_alignments,
    phone_table,
    pdf_alignments=None,
    n_samples=None,
    frame_rate=None,
    mode="majority",
    tolerance=3,
    snip_edges=True,
):
    """Kaldi phone (and pdf-id) alignments -> unit streams per utterance at the encoder rate.

    Arguments
    ---------
    phone_alignments : str or dict
        Per-frame phone ids (ark/scp path, or ``{utt: array}``).
    phone_table : str or dict
        Kaldi ``phones.txt`` path, or a mapping from :func:`read_phone_table`.
    pdf_alignments : str or dict, optional
        Per-frame pdf-ids; adds ``senone.*`` streams (units: the run-length pdf sequence,
        silence pdfs included since Kaldi does not mark them apart).
    n_samples : dict, optional
        ``{utt: number of audio samples}``; the alignment is fitted to the audio's frame count
        (refused beyond ``tolerance`` feature frames, naming the utterance). Without it the
        length follows the alignment.
    frame_rate : FrameRate, optional
    mode : str
        ``"majority"`` or ``"centre"``.
    tolerance : int
        Largest accepted length difference in 10 ms frames.
    snip_edges : bool
        Whether the Kaldi features used ``--snip-edges=true`` (Kaldi's default).

    Returns
    -------
    dict
        ``{utt: {stream name: int32 array}}`` with ``monophone.*`` (and ``senone.*``) streams and
        ``feature_positions``, as :func:`~sb_crossmodal_kd.units.types.unit_streams`
        produces.
    """
    frame_rate = frame_rate or FrameRate()
    if not isinstance(phone_table, dict):
        phone_table = read_phone_table(phone_table)
    phones = (
        read_int_alignments(phone_alignments)
        if not isinstance(phone_alignments, dict) else phone_alignments
    )
    pdfs = None
    if pdf_alignments is not None:
        pdfs = (
            read_int_alignments(pdf_alignments)
            if not isinstance(pdf_alignments, dict) else pdf_alignments
        )
    lookup = np.full(max(phone_table) + 1, -1, dtype=np.int64)
    for k, v in phone_table.items():
        lookup[k] = v
    out = {}
    for utt, kaldi_phones in phones.items():
        if kaldi_phones.max(initial=0) >= len(lookup) or (lookup[kaldi_phones] < 0).any():
            bad = sorted({int(p) for p in kaldi_phones if p >= len(lookup) or lookup[p] < 0})
            raise ValueError(f"utterance {utt!r}: phone ids {bad[:5]} are not in the phone table")
        window_ms = 25.0
        kaldi_frames = len(kaldi_phones)
        if n_samples is not None:
            if utt not in n_samples:
                raise KeyError(f"utterance {utt!r} has a Kaldi alignment but no audio length")
            n_feat = frame_rate.feature_frames(n_samples[utt])
            # The frame count Kaldi itself would give this audio.
            hop = frame_rate.hop_samples
            win = int(round(frame_rate.sample_rate * window_ms / 1000))
            expected = 1 + (n_samples[utt] - win) // hop if snip_edges else (n_samples[utt] + hop // 2) // hop
            fit_to_length(np.zeros(kaldi_frames), expected, tolerance, utt)
        else:
            n_feat = kaldi_frames + (2 if snip_edges else 0)
        labels = kaldi_to_feature_frames(
            lookup[kaldi_phones], n_feat, window_ms, frame_rate.hop_length_ms, snip_edges
        )
        n_enc = frame_rate.encoder_frames(n_feat)
        units, feat_positions = sequence_and_positions(labels, skip=SILENCE_INDEX)
        positions = frame_rate.downsample(feat_positions, mode, n_enc)
        streams = {
            "feature_positions": feat_positions.astype(np.int32),
            "monophone.units": units.astype(np.int32),
            "monophone.frame_to_position": positions,
            "monophone.frame_labels": frame_rate.downsample(labels, mode, n_enc),
        }
        if pdfs is not None:
            if utt not in pdfs:
                raise KeyError(f"utterance {utt!r} has a phone alignment but no pdf alignment")
            if len(pdfs[utt]) != kaldi_frames:
                raise ValueError(
                    f"utterance {utt!r}: pdf alignment has {len(pdfs[utt])} frames, phone "
                    f"alignment {kaldi_frames}; they must come from the same alignment"
                )
            pdf_feat = kaldi_to_feature_frames(
                pdfs[utt], n_feat, window_ms, frame_rate.hop_length_ms, snip_edges
            )
            pdf_units, pdf_positions = sequence_and_positions(pdf_feat)
            streams["senone.units"] = pdf_units.astype(np.int32)
            streams["senone.frame_to_position"] = frame_rate.downsample(pdf_positions, mode, n_enc)
            streams["senone.frame_labels"] = frame_rate.downsample(pdf_feat, mode, n_enc)
        out[utt] = streams
    return out


def kaldi_tree_hash(pdf_alignments_path, num_pdfs=None):
    """A header hash naming a Kaldi tree by its pdf alignment file (and pdf count)."""
    digest = hashlib.sha256(f"{pdf_alignments_path}:{num_pdfs}".encode()).hexdigest()[:16]
    return f"kaldi:{digest}"
