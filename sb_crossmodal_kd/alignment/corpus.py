"""Corpus-level steps on SpeechBrain CSV manifests: align, build the senone tree, export units.

These are the library functions behind ``sbkd align``, ``sbkd build-tree`` and
``sbkd export-units``; each reads and writes files with a header naming what they were built
from.

- :func:`align_manifest`: monophone forced alignment of every utterance of a manifest with a
  trained :class:`~sb_crossmodal_kd.alignment.forced.PhoneAligner`; OOV utterances are skipped
  (``"skip"`` policy) with the reason recorded. :func:`save_alignments` /
  :func:`load_alignments` keep them as JSON (10 ms phone positions, word and phone times);
  :func:`load_phone_segments` reads their phone segments, or a corpus's own timings.
- :func:`tree_statistics`: single-Gaussian statistics of each triphone state's frames
  (the aligner's normalised log-Mel features) for :meth:`SenoneTree.build`.
- :func:`export_units`: one :class:`~sb_crossmodal_kd.units.store.UnitStore` per split with
  phone, senone and subword sequences and their encoder-frame alignments.
"""

import csv
import json
import logging
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sb_crossmodal_kd.alignment.framerate import FrameRate, fit_to_length
from sb_crossmodal_kd.alignment.viterbi import AlignmentError
from sb_crossmodal_kd.data.audio import audio_samples, load_audio
from sb_crossmodal_kd.io import atomic_write_text
from sb_crossmodal_kd.units.lexicon import OutOfVocabularyError
from sb_crossmodal_kd.units.phones import PHONES
from sb_crossmodal_kd.units.senones import TriphoneStats
from sb_crossmodal_kd.units.store import UnitStoreWriter
from sb_crossmodal_kd.units.types import AlignedUtterance, UnitResources, unit_streams

logger = logging.getLogger(__name__)

ALIGNMENTS_FORMAT = "sbkd-phone-alignments-1"


def read_manifest(path, text_key="wrd"):
    """Rows of a SpeechBrain CSV manifest as dicts; checks the columns needed here."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"ID", "wav", text_key} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: manifest lacks the column(s) {sorted(missing)}")
        return list(reader)


def align_manifest(aligner, rows, text_key="wrd", progress=True):
    """Aligns every row of a manifest.

    Returns
    -------
    alignments : dict
        ID -> :class:`~sb_crossmodal_kd.alignment.phone_alignment.PhoneAlignment`.
    report : dict
        ``{"utterances", "aligned", "skipped": [(id, reason)], "audio_s", "seconds",
        "audio_s_per_s"}``.
    """
    alignments, skipped, audio_s = {}, [], 0.0
    start = time.time()
    for row in tqdm(rows, desc="align", disable=not progress):
        utt = row["ID"]
        try:
            sample_rate = aligner.settings.frame_rate.sample_rate
            wav = load_audio(row["wav"], sample_rate)
            audio_s += len(wav) / sample_rate
            alignments[utt] = aligner.align(wav, row[text_key], utt)
        except (OutOfVocabularyError, AlignmentError) as error:
            skipped.append((utt, str(error)))
            logger.warning("Skipping utterance %s: %s", utt, error)
    seconds = time.time() - start
    report = {
        "utterances": len(rows),
        "aligned": len(alignments),
        "skipped": skipped,
        "audio_s": round(audio_s, 2),
        "seconds": round(seconds, 2),
        "audio_s_per_s": round(audio_s / max(seconds, 1e-9), 2),
    }
    return alignments, report


def save_alignments(path, alignments, header):
    """Writes phone alignments as JSON with ``header`` (lexicon hash, aligner settings)."""
    payload = {
        "format": ALIGNMENTS_FORMAT,
        "header": header,
        "utterances": {utt: alignment_record(a) for utt, a in alignments.items()},
    }
    atomic_write_text(path, json.dumps(payload) + "\n")


def alignment_record(alignment):
    """The JSON record of one :class:`PhoneAlignment`, as :func:`save_alignments` stores it."""
    return {
        "phones": alignment.phones,
        "feature_positions": alignment.feature_positions.tolist(),
        "words": [list(w) for w in alignment.words],
        "phone_segments": [list(p) for p in alignment.phone_segments],
    }


def load_alignments(path, lexicon_hash=None):
    """Reads :func:`save_alignments` output; refuses alignments made with another lexicon."""
    with open(path, encoding="utf-8") as f:
        payload = json.load(f)
    if payload.get("format") != ALIGNMENTS_FORMAT:
        raise ValueError(f"{path}: not a phone alignment file written by `sbkd align`")
    found = payload["header"].get("lexicon")
    if lexicon_hash is not None and found != lexicon_hash:
        raise ValueError(
            f"{path}: aligned with lexicon {found!r}, but {lexicon_hash!r} is in use; "
            "re-run `sbkd align` with this lexicon"
        )
    return payload["header"], payload["utterances"]


def load_phone_segments(path):
    """Phone segments per utterance from a forced-alignment or a corpus timing file.

    Reads either an ``sbkd align`` output (:func:`save_alignments`: the aligner's segments,
    with the utterances it skipped) or a SynthCommands ``<split>_alignments.json`` (the
    synthesiser's own timings, ``{ID: {"phones": [[phone, start_s, end_s], ...]}}``).

    Returns
    -------
    segments : dict
        ``{ID: [[phone, start_s, end_s], ...]}``
    skipped : dict
        ``{ID: reason}`` of the utterances the aligner left out (empty for timing files).

    Example
    -------
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "test_alignments.json"
    >>> _ = path.write_text('{"u1": {"phones": [["sil", 0.0, 0.1], ["AA", 0.1, 0.3]]}}')
    >>> load_phone_segments(path)
    ({'u1': [['sil', 0.0, 0.1], ['AA', 0.1, 0.3]]}, {})
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: give `sbkd align` output (<split>_phone_alignments.json) or a "
            "SynthCommands corpus's <split>_alignments.json (sbkd corpus --output DIR)"
        )
    with open(path, encoding="utf-8") as f:
        payload = json.load(f)
    if isinstance(payload, dict) and payload.get("format") == ALIGNMENTS_FORMAT:
        report = payload["header"].get("report", {})
        skipped = {utt: reason for utt, reason in report.get("skipped", [])}
        return ({utt: entry["phone_segments"] for utt, entry in payload["utterances"].items()},
                skipped)
    try:
        return {utt: entry["phones"] for utt, entry in payload.items()}, {}
    except (AttributeError, TypeError, KeyError) as error:
        raise ValueError(
            f"{path}: neither `sbkd align` output nor {{ID: {{\"phones\": [[phone, start_s, "
            f"end_s], ...]}}}} ({error!r})"
        ) from error


def tree_statistics(alignments, rows, features, sample_rate, progress=True):
    """Triphone-state statistics of a corpus.

    Arguments
    ---------
    alignments : dict
        ID -> alignment record from :func:`load_alignments` (``phones``, ``feature_positions``),
        or anything with their ``get``.
    rows : list of dict
        Manifest rows (``ID``, ``wav``).
    features : callable
        Waveform -> ``(T, D)`` features at the alignment's 10 ms rate
        (e.g. ``PhoneAligner.features``).
    sample_rate : int
        The rate ``features`` reads (audio at another rate is resampled on load).
    """
    stats = accumulate_tree_statistics(alignments, rows, features, sample_rate, progress)
    if stats is None:
        raise ValueError("tree_statistics: no manifest row has an alignment")
    return stats


def accumulate_tree_statistics(alignments, rows, features, sample_rate, progress=False):
    """:func:`tree_statistics` of some rows, ``None`` when none of them has an alignment."""
    stats = None
    for row in tqdm(rows, desc="tree statistics", disable=not progress):
        record = alignments.get(row["ID"])
        if record is None:
            continue
        feats = features(load_audio(row["wav"], sample_rate))
        positions = fit_to_length(
            np.asarray(record["feature_positions"]), feats.shape[0], 2, row["ID"], fill=-1
        )
        if stats is None:
            stats = TriphoneStats(dim=feats.shape[1])
        stats.add(record["phones"], positions, feats)
    return stats


def export_units(
    path,
    alignments,
    rows,
    lexicon_hash,
    tree=None,
    tokenizer=None,
    frame_rate=None,
    mode="majority",
    text_key="wrd",
    progress=True,
    meta=None,
):
    """Writes one split's unit store from its phone alignments.

    Every encoder-frame stream is sized from the audio file's real length
    (``FrameRate.frames_for_samples``), so it matches the encoder output. ``alignments`` is a
    dict or anything with its ``get``; ``meta`` adds keys to the header's ``meta``.

    Returns
    -------
    dict
        ``{"utterances": written, "missing": [IDs without an alignment]}``.
    """
    frame_rate = frame_rate or FrameRate()
    header = unit_store_header(lexicon_hash, tree, tokenizer, frame_rate, mode)
    header["meta"].update(meta or {})
    resources = UnitResources(tokenizer=tokenizer, tree=tree)
    missing = []
    with UnitStoreWriter(path, header) as writer:
        for row in tqdm(rows, desc=f"export {path}", disable=not progress):
            record = alignments.get(row["ID"])
            if record is None:
                missing.append(row["ID"])
                continue
            n_samples = audio_samples(row["wav"], frame_rate.sample_rate)
            n_frames = frame_rate.frames_for_samples(n_samples)
            positions = fit_to_length(
                np.asarray(record["feature_positions"]),
                frame_rate.feature_frames(n_samples), 2, row["ID"], fill=-1,
            )
            alignment = AlignedUtterance(
                [PHONES.index(p) for p in record["phones"]], positions, n_frames, frame_rate,
                text=row[text_key], word_times=[tuple(w) for w in record["words"]], mode=mode,
            )
            streams = unit_streams(alignment, resources)
            writer.add(row["ID"], streams)
    if missing:
        logger.warning("%d utterances of %s have no alignment (skipped)", len(missing), path)
    return {"utterances": len(rows) - len(missing), "missing": missing}


def unit_store_header(lexicon_hash, tree=None, tokenizer=None, frame_rate=None, mode="majority"):
    """The header :func:`export_units` gives a unit store: what its units were built with.

    Example
    -------
    >>> unit_store_header("lex:1")["frame_rate"]["strides"], unit_store_header("lex:1")["meta"]
    ([2, 2], {'mode': 'majority'})
    """
    frame_rate = frame_rate or FrameRate()
    return {
        "lexicon": lexicon_hash,
        "tokenizer": tokenizer.hash if tokenizer is not None else None,
        "tree": tree.hash if tree is not None else None,
        "frame_rate": {
            "sample_rate": frame_rate.sample_rate,
            "hop_length_ms": frame_rate.hop_length_ms,
            "strides": list(frame_rate.strides),
            "kernel_sizes": list(frame_rate.kernel_sizes),
        },
        "meta": {"mode": mode},
    }
