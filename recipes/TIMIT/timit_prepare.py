#!/usr/bin/env python3
"""Prepares TIMIT (LDC93S1) for this package's recipes: manifests and hand-labelled phones.

Reads the official layout, upper- or lower-case::

    TIMIT/TRAIN|TEST/DR1..DR8/<speaker>/<utterance>.WAV|.PHN|.WRD

(``.WAV`` is NIST SPHERE, read with soundfile; RIFF copies work too.) The standard split:
train = every TRAIN speaker (462), valid = the 50-speaker development set and test = the
24-speaker core test set, both from TEST (Kaldi's ``conf/dev_spk.list`` and
``conf/test_spk.list``, also SpeechBrain's TIMIT recipe). The dialect ``SA`` sentences, read
by every speaker, are left out unless ``include_sa``.

Writes into ``save_folder``:

- ``{train,valid,test}.csv``: ``ID, duration, wav, spk_id, wrd, phn61, phn`` (``phn61`` the
  hand labels as written, ``phn`` folded to the 39-set, ``q`` removed);
- ``{split}_alignments.json``: the hand segmentation in the frame recipe's format
  (``{ID: {"phones": [[phone, start_s, end_s], ...], "words": [...]}}``) with phones of
  the package's inventory through the 39-set (:data:`~sb_crossmodal_kd.units.timit.
  TIMIT_TO_PACKAGE_39`), read by ``recipes/SynthCommands/frame_classification`` (it labels
  each 10 ms frame with the phone covering the frame's centre);
- ``{split}_alignments_cmudict.json``: the same with ``ao``/``zh`` kept as ``AO``/``ZH``;
- ``{split}_phone_alignments.json``: the hand segmentation as a phone alignment
  (:func:`sb_crossmodal_kd.alignment.corpus.save_alignments` format: phone sequence without
  silence and its position per 10 ms frame), so it can replace forced alignment wherever
  unit stores are exported (:func:`sb_crossmodal_kd.alignment.corpus.export_units`);
- ``timit_prepare.json``: the settings; a folder prepared with other settings is refused.

Sample offsets become seconds (``sample / 16000``); phones that run past the audio by at most
``phn_tolerance_ms`` are clipped to it. Phones ending further past the audio, or further
before its end, are an error naming the file.

    python timit_prepare.py --data_folder /path/to/TIMIT --save_folder DATA
"""

import argparse
import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import soundfile

from sb_crossmodal_kd.alignment.corpus import save_alignments
from sb_crossmodal_kd.alignment.forced import PhoneAlignment
from sb_crossmodal_kd.alignment.framerate import FrameRate
from sb_crossmodal_kd.io import atomic_write_text
from sb_crossmodal_kd.prep.provenance import Provenance
from sb_crossmodal_kd.units.phones import SILENCE, phone_index
from sb_crossmodal_kd.units.timit import check_timit_phone, fold_61_to_39, phone_map

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
SPLITS = ("train", "valid", "test")
CSV_COLUMNS = ("ID", "duration", "wav", "spk_id", "wrd", "phn61", "phn")
SETTINGS_FILE = "timit_prepare.json"

# The 24-speaker core test set (2 men and 1 woman per dialect region, DR1..DR8).
CORE_TEST_SPEAKERS = (
    "MDAB0", "MWBT0", "FELC0", "MTAS1", "MWEW0", "FPAS0", "MJMP0", "MLNT0", "FPKT0", "MLLL0",
    "MTLS0", "FJLM0", "MBPM0", "MKLT0", "FNLP0", "MCMJ0", "MJDH0", "FMGD0", "MGRT0", "MNJM0",
    "FDHC0", "MJLN0", "MPAM0", "FMLD0",
)

# The 50-speaker development set, from TEST and disjoint from the core test set.
DEV_SPEAKERS = (
    "FAKS0", "FDAC1", "FJEM0", "MGWT0", "MJAR0", "MMDB1", "MMDM2", "MPDF0", "FCMH0", "FKMS0",
    "MBDG0", "MBWM0", "MCSH0", "FADG0", "FDMS0", "FEDW0", "MGJF0", "MGLB0", "MRTK0", "MTAA0",
    "MTDT0", "MTHC0", "MWJG0", "FNMR0", "FREW0", "FSEM0", "MBNS0", "MMJR0", "MDLS0", "MDLF0",
    "MDVC0", "MERS0", "FMAH0", "FDRW0", "MRCS0", "MRJM4", "FCAL1", "MMWH0", "FJSJ0", "MAJC0",
    "MJSW0", "MREB0", "FGJD0", "FJMG0", "MROA0", "MTEB0", "MJFC0", "MRJR0", "FMML0", "MRWS1",
)


class TimitError(ValueError):
    """A TIMIT folder or file that cannot be used, named with what to do."""


@dataclass
class Utterance:
    """One TIMIT utterance: its files and what was read from them."""

    utterance_id: str
    speaker: str
    wav: Path
    n_samples: int
    phones: list  # [(label, start_sample, end_sample)], TIMIT labels, lower case
    words: list  # [(word, start_sample, end_sample)]


def prepare_timit(data_folder, save_folder, include_sa=False, phn_tolerance_ms=10.0):
    """Writes the manifests and phone alignments of TIMIT's train, valid and test sets.

    Arguments
    ---------
    data_folder : str or Path
        The TIMIT folder holding ``TRAIN`` and ``TEST`` (any case).
    save_folder : str or Path
        Where the outputs go (see the module docstring).
    include_sa : bool
        Keep the two dialect sentences (``SA1``, ``SA2``) every speaker reads.
    phn_tolerance_ms : float
        How far the last phone may end past, or before, the end of the audio before it is an
        error (the frame recipe accepts 2 frames of difference; 10 ms stays within that).

    Returns
    -------
    dict
        ``{split: csv path}``.

    Example
    -------
    >>> tree = getfixture("tmp_path") / "TIMIT"
    >>> prepare_timit(tree, tree / "out")
    Traceback (most recent call last):
    ...
    timit_prepare.TimitError: TIMIT folder .../TIMIT does not exist; ...
    """
    data_folder, save_folder = Path(data_folder), Path(save_folder)
    settings = {"data_folder": str(data_folder.resolve()), "include_sa": bool(include_sa),
                "phn_tolerance_ms": float(phn_tolerance_ms)}
    outputs = {split: save_folder / f"{split}.csv" for split in SPLITS}
    record = Provenance(save_folder / SETTINGS_FILE, settings,
                        f"{save_folder} holds TIMIT prepared",
                        remedy="Choose another --save_folder or delete that one", error=TimitError)
    if record.complete(outputs.values()):
        logger.info("%s already holds TIMIT prepared with these settings", save_folder)
        return outputs

    train_dir, test_dir = find_split_folders(data_folder)
    tolerance = int(round(phn_tolerance_ms * SAMPLE_RATE / 1000))
    utterances = {
        "train": read_speakers(train_dir, None, include_sa, tolerance),
        "valid": read_speakers(test_dir, DEV_SPEAKERS, include_sa, tolerance),
        "test": read_speakers(test_dir, CORE_TEST_SPEAKERS, include_sa, tolerance),
    }
    for split, utts in utterances.items():
        write_split(save_folder, split, utts)
    record.write()
    return outputs


def _child(folder, name):
    """The entry of ``folder`` called ``name`` in any case, or None."""
    for entry in sorted(folder.iterdir()):
        if entry.name.lower() == name.lower():
            return entry
    return None


def find_split_folders(data_folder):
    """``(TRAIN folder, TEST folder)`` of a TIMIT tree (upper- or lower-case names).

    Also looks one level down (``TIMIT/TIMIT/TRAIN``, ``TIMIT/DATA/TRAIN``), as some copies
    of the corpus nest it.
    """
    data_folder = Path(data_folder)
    if not data_folder.is_dir():
        raise TimitError(
            f"TIMIT folder {data_folder} does not exist; give --data_folder the folder that "
            "holds TRAIN and TEST (the LDC93S1 layout)"
        )
    candidates = [data_folder] + [
        child for name in ("timit", "data") if (child := _child(data_folder, name)) is not None
    ]
    for folder in candidates:
        train, test = _child(folder, "train"), _child(folder, "test")
        if train is not None and test is not None and train.is_dir() and test.is_dir():
            return train, test
    present = [name for name in ("TRAIN", "TEST") if _child(data_folder, name) is not None]
    missing = [name for name in ("TRAIN", "TEST") if name not in present]
    raise TimitError(
        f"{data_folder} is not a TIMIT folder: {' and '.join(missing)} missing (found: "
        f"{', '.join(sorted(e.name for e in data_folder.iterdir())) or 'nothing'}). Expected "
        "TIMIT/TRAIN|TEST/DR1..DR8/<speaker>/<utterance>.WAV with .PHN and .WRD beside it"
    )


def read_speakers(split_dir, speakers, include_sa, tolerance):
    """Utterances of ``split_dir`` (a TRAIN or TEST folder), of ``speakers`` (None: all).

    Speakers of the list that the folder lacks are logged; a set left empty is an error.
    """
    regions = [d for d in sorted(split_dir.iterdir()) if d.is_dir() and d.name.lower()
               .startswith("dr")]
    if not regions:
        raise TimitError(
            f"{split_dir} has no dialect-region folders (DR1..DR8); is it a TIMIT "
            f"{split_dir.name} folder?"
        )
    wanted = None if speakers is None else set(speakers)
    utterances, found = [], set()
    for region in regions:
        for speaker_dir in sorted(d for d in region.iterdir() if d.is_dir()):
            speaker = speaker_dir.name.upper()
            if wanted is not None and speaker not in wanted:
                continue
            found.add(speaker)
            utterances.extend(read_speaker(speaker_dir, include_sa, tolerance))
    if wanted is not None and wanted - found:
        logger.warning("%s lacks %d listed speakers: %s", split_dir, len(wanted - found),
                       ", ".join(sorted(wanted - found)))
    if not utterances:
        which = "any speaker" if wanted is None else f"any of the {len(wanted)} listed speakers"
        raise TimitError(f"{split_dir}: no utterances found for {which}")
    return utterances


def read_speaker(speaker_dir, include_sa, tolerance):
    """The utterances of one speaker folder; each ``.WAV`` needs its ``.PHN`` and ``.WRD``."""
    files = {}
    for entry in speaker_dir.iterdir():
        stem, dot, extension = entry.name.partition(".")
        if dot and extension.lower() in ("wav", "phn", "wrd"):
            files[(stem.upper(), extension.lower())] = entry
    speaker = speaker_dir.name.upper()
    utterances = []
    for stem in sorted({stem for stem, _ in files}):
        if stem.startswith("SA") and not include_sa:
            continue
        wav = files.get((stem, "wav"))
        if wav is None:
            other = files.get((stem, "phn")) or files.get((stem, "wrd"))
            raise TimitError(f"{other} has no audio: {speaker_dir / stem}.WAV is missing")
        for extension in ("phn", "wrd"):
            if (stem, extension) not in files:
                raise TimitError(
                    f"{wav} has no .{extension.upper()} file beside it "
                    f"({speaker_dir / stem}.{extension.upper()} is missing); restore it from "
                    "the TIMIT distribution"
                )
        info = soundfile.info(str(wav))
        if info.samplerate != SAMPLE_RATE:
            raise TimitError(f"{wav} is sampled at {info.samplerate} Hz; TIMIT is 16 kHz")
        phones = read_segments(files[(stem, "phn")], info.frames, tolerance, is_phone=True)
        words = read_segments(files[(stem, "wrd")], info.frames, tolerance, is_phone=False)
        utterances.append(Utterance(f"{speaker}_{stem}", speaker, wav, info.frames, phones,
                                    words))
    return utterances


def read_segments(path, n_samples, tolerance, is_phone):
    """``[(label, start_sample, end_sample)]`` of a ``.PHN`` or ``.WRD`` file.

    Ends past the audio by at most ``tolerance`` samples are clipped to it. Phones must not
    overlap (words may: TIMIT's word boundaries share samples) and must reach the end of the
    audio to within ``tolerance``.

    Example
    -------
    >>> path = getfixture("tmp_path") / "SX1.PHN"
    >>> _ = path.write_text("0 2000 h#\\n2000 3600 sh\\n3600 4010 h#\\n")
    >>> read_segments(path, 4000, 160, is_phone=True)
    [('h#', 0, 2000), ('sh', 2000, 3600), ('h#', 3600, 4000)]
    >>> read_segments(path, 3000, 160, is_phone=True)
    Traceback (most recent call last):
    ...
    timit_prepare.TimitError: .../SX1.PHN: the last segment ends at sample 4010 but the audio has 3000 samples ...
    """
    segments = []
    for number, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        where = f"{path}, line {number}"
        try:
            start, end, label = int(fields[0]), int(fields[1]), fields[2]
        except (IndexError, ValueError):
            raise TimitError(
                f"{where}: expected 'start_sample end_sample label', got {line!r}"
            ) from None
        if len(fields) != 3 or end < start:
            raise TimitError(f"{where}: expected 'start_sample end_sample label' with "
                             f"start <= end, got {line!r}")
        if is_phone:
            label = check_timit_phone(label, where)
            if segments and start < segments[-1][2]:
                raise TimitError(f"{where}: phone starts at sample {start}, before the previous "
                                 f"one ends ({segments[-1][2]}); phones must not overlap")
        segments.append((label, start, end))
    if not segments:
        raise TimitError(f"{path} is empty")
    last = max(end for _, _, end in segments)
    if last > n_samples + tolerance:
        raise TimitError(
            f"{path}: the last segment ends at sample {last} but the audio has {n_samples} "
            f"samples (tolerance {tolerance}); the labels do not belong to this audio, or "
            "the audio is truncated"
        )
    if is_phone and last < n_samples - tolerance:
        raise TimitError(
            f"{path}: the phones end at sample {last} but the audio has {n_samples} samples "
            f"(tolerance {tolerance}), so its end would have no label; the labels do not "
            "belong to this audio, or the .PHN file is truncated"
        )
    return [(label, min(start, n_samples), min(end, n_samples))
            for label, start, end in segments]


def timed_phones(utterance, phone_set):
    """``[[package phone, start_s, end_s]]`` of an utterance, ``q`` dropped (left unlabelled)."""
    table = phone_map(phone_set)
    return [
        [table[label], start / SAMPLE_RATE, end / SAMPLE_RATE]
        for label, start, end in utterance.phones
        if table[label] is not None and end > start
    ]


def hand_alignment(utterance):
    """The hand segmentation as a :class:`~sb_crossmodal_kd.alignment.forced.PhoneAlignment`
    at 10 ms (CMUdict inventory): each feature frame takes the phone covering its centre."""
    rate = FrameRate(sample_rate=SAMPLE_RATE)
    segments = timed_phones(utterance, "cmudict")
    sequence, positioned = [], []
    for phone, start, end in segments:
        if phone != SILENCE:
            positioned.append((len(sequence), start, end))
            sequence.append(phone)
    n_frames = rate.feature_frames(utterance.n_samples)
    shift = rate.feature_shift_s
    positions = rate.segments_to_frames(positioned, n_frames, shift_s=shift, fill=-1)
    labels = rate.segments_to_frames([(phone_index(p), s, e) for p, s, e in segments],
                                     n_frames, shift_s=shift, fill=0)
    words = [(w, s / SAMPLE_RATE, e / SAMPLE_RATE) for w, s, e in utterance.words]
    return PhoneAlignment(utterance.utterance_id, sequence, positions, labels, words,
                          [tuple(s) for s in segments])


def write_split(save_folder, split, utterances):
    """Writes one split's manifest and its three alignment files."""
    rows, frame_files = [], {"timit39": {}, "cmudict": {}}
    for utt in utterances:
        words = [w for w, _, _ in utt.words]
        rows.append({
            "ID": utt.utterance_id,
            "duration": f"{utt.n_samples / SAMPLE_RATE:.4f}",
            "wav": str(utt.wav.resolve()),
            "spk_id": utt.speaker,
            "wrd": " ".join(words),
            "phn61": " ".join(label for label, _, _ in utt.phones),
            "phn": " ".join(fold_61_to_39(label for label, _, _ in utt.phones)),
        })
        timed_words = [[w, s / SAMPLE_RATE, e / SAMPLE_RATE] for w, s, e in utt.words]
        for phone_set, entries in frame_files.items():
            entries[utt.utterance_id] = {"phones": timed_phones(utt, phone_set),
                                         "words": timed_words}
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    save_folder = Path(save_folder)
    atomic_write_text(save_folder / f"{split}_alignments.json",
                      json.dumps(frame_files["timit39"]) + "\n")
    atomic_write_text(save_folder / f"{split}_alignments_cmudict.json",
                      json.dumps(frame_files["cmudict"]) + "\n")
    save_alignments(
        save_folder / f"{split}_phone_alignments.json",
        {utt.utterance_id: hand_alignment(utt) for utt in utterances},
        {"lexicon": None, "source": "TIMIT hand segmentation", "phone_set": "cmudict"},
    )
    # The manifest last: its presence marks the split as complete.
    atomic_write_text(save_folder / f"{split}.csv", buffer.getvalue())
    logger.info("TIMIT %s: %d utterances", split, len(rows))


def main(argv=None):
    """Command line: ``timit_prepare.py --data_folder TIMIT --save_folder DATA``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_folder", required=True, help="folder holding TRAIN and TEST")
    parser.add_argument("--save_folder", required=True, help="where manifests are written")
    parser.add_argument("--include_sa", action="store_true", help="keep the SA sentences")
    parser.add_argument("--phn_tolerance_ms", type=float, default=10.0,
                        help="how far the phones' end may miss the audio's end")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    outputs = prepare_timit(args.data_folder, args.save_folder, args.include_sa,
                            args.phn_tolerance_ms)
    for split, path in outputs.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
