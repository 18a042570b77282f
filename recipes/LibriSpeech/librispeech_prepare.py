#!/usr/bin/env python3
"""LibriSpeech for the KD conditions: SpeechBrain CSVs from the official layout, then the
KD data chain (units, alignments, senone tree, unit LMs, teacher caches).

    python librispeech_prepare.py --data_folder /data/LibriSpeech --output OUT --train_set 100 \
        [--lm_text /data/librispeech-lm-norm.txt] [--settings hparams/prep.yaml] [--device cuda:0] \
        [--jobs N]
    torchrun --nproc_per_node=R librispeech_prepare.py ...   # R ranks, each with --jobs N

writes ``OUT/manifests/{train,valid,test}.csv`` (``ID, duration, wav, spk_id, wrd``) and the
KD data in ``OUT/prep``; then ``python train.py hparams/kd.yaml --condition NAME
--prep_folder OUT/prep``. ``--train_set``: ``100`` (train-clean-100), ``460`` (+ train-clean-360)
or ``960`` (+ train-other-500); valid is dev-clean and test test-clean unless
``--valid_split`` / ``--test_split`` say otherwise. Without ``--lm_text`` the unit LMs train on
the training transcripts (logged). Alignment, tree statistics and unit stores run shard by
shard in ``--jobs`` processes (default: every core), and under ``torchrun`` over the ranks
too; the outputs are the same bytes whatever ran them.

The layout read (as distributed on openslr.org/12)::

    <data_folder>/<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt
    <data_folder>/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utterance>.flac
"""

import argparse
import logging
import os
import sys
from pathlib import Path

from sb_crossmodal_kd.data.manifest import write_manifest_csv
from sb_crossmodal_kd.distributed import finish_process, init_distributed, main_first
from sb_crossmodal_kd.prep.provenance import Provenance
from sb_crossmodal_kd.prep.recipes import add_chain_arguments, run_chain

logger = logging.getLogger(__name__)

TRAIN_SETS = {
    "100": ("train-clean-100",),
    "460": ("train-clean-100", "train-clean-360"),
    "960": ("train-clean-100", "train-clean-360", "train-other-500"),
}
SPLITS = ("train-clean-100", "train-clean-360", "train-other-500", "dev-clean", "dev-other",
          "test-clean", "test-other")


class LibriSpeechError(ValueError):
    """A LibriSpeech folder with a missing or unreadable part."""


def librispeech_root(data_folder):
    """The folder holding the split folders: ``data_folder`` or its ``LibriSpeech/``.

    Example
    -------
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> librispeech_root(folder) == folder
    True
    >>> (folder / "LibriSpeech").mkdir()
    >>> librispeech_root(folder).name
    'LibriSpeech'
    """
    data_folder = Path(data_folder)
    nested = data_folder / "LibriSpeech"
    return nested if nested.is_dir() else data_folder


def split_rows(root, split):
    """Manifest rows of one split, sorted by ID.

    Raises
    ------
    LibriSpeechError
        Naming the missing split folder, the trans.txt line whose audio is missing, or the
        unreadable flac.
    """
    import soundfile

    folder = Path(root) / split
    if not folder.is_dir():
        found = sorted(p.name for p in Path(root).iterdir() if p.is_dir()) if Path(
            root).is_dir() else []
        raise LibriSpeechError(
            f"{folder}: split {split} not found (found: {', '.join(found) or 'nothing'}). "
            f"Download and extract {split}.tar.gz from openslr.org/12 into {root}"
        )
    transcripts = sorted(folder.glob("*/*/*.trans.txt"))
    if not transcripts:
        raise LibriSpeechError(
            f"{folder}: no <speaker>/<chapter>/<speaker>-<chapter>.trans.txt files; is the "
            "archive fully extracted?"
        )
    rows = []
    for trans in transcripts:
        for number, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            utt, _, words = line.strip().partition(" ")
            if not words.strip():
                raise LibriSpeechError(f"{trans}, line {number}: utterance {utt} has no words")
            flac = trans.parent / f"{utt}.flac"
            if not flac.is_file():
                raise LibriSpeechError(
                    f"{trans}, line {number}: the audio of utterance {utt} is missing "
                    f"({flac}); re-extract {split}"
                )
            try:
                info = soundfile.info(str(flac))
            except Exception as err:  # soundfile raises several types for corrupt files
                raise LibriSpeechError(f"{flac}: cannot read the audio of {utt}: {err}") from None
            if info.frames == 0:
                raise LibriSpeechError(f"{flac}: the audio of {utt} is empty")
            rows.append({"ID": utt, "duration": round(info.frames / info.samplerate, 4),
                         "wav": str(flac.resolve()), "spk_id": utt.split("-")[0],
                         "wrd": " ".join(words.split())})
    return sorted(rows, key=lambda row: row["ID"])


def prepare_librispeech(data_folder, save_folder, train_set="100", valid_split="dev-clean",
                        test_split="test-clean"):
    """Writes ``save_folder/{train,valid,test}.csv`` from a LibriSpeech folder.

    Arguments
    ---------
    data_folder : str or Path
        The folder holding the split folders (or its parent, holding ``LibriSpeech/``).
    save_folder : str or Path
        Where the CSVs go (with ``prepare.json``: the options they were made with).
    train_set : str
        ``"100"``, ``"460"`` or ``"960"`` hours (:data:`TRAIN_SETS`).
    valid_split, test_split : str
        The splits of ``valid.csv`` and ``test.csv``.

    Returns
    -------
    dict
        ``{"train": path, "valid": path, "test": path}``. Done already with the same options:
        nothing is re-read; with other options the folder is refused (the KD data made from
        it would be stale).
    """
    if str(train_set) not in TRAIN_SETS:
        raise ValueError(f"train_set {train_set!r}: choose 100, 460 or 960")
    for split in (valid_split, test_split):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; LibriSpeech's are {', '.join(SPLITS)}")
    root = librispeech_root(data_folder).resolve()
    save_folder = Path(save_folder)
    options = {"data_folder": str(root), "train_set": str(train_set),
               "train_splits": list(TRAIN_SETS[str(train_set)]), "valid_split": valid_split,
               "test_split": test_split}
    manifests = {name: save_folder / f"{name}.csv" for name in ("train", "valid", "test")}
    record = Provenance(save_folder / "prepare.json", options,
                        f"{save_folder} holds LibriSpeech manifests made",
                        remedy="Choose another output folder")
    if record.complete(manifests.values()):
        logger.info("%s: LibriSpeech manifests already prepared", save_folder)
        return manifests
    splits = {"train": TRAIN_SETS[str(train_set)], "valid": (valid_split,),
              "test": (test_split,)}
    for name, parts in splits.items():
        rows = [row for split in parts for row in split_rows(root, split)]
        write_manifest_csv(manifests[name], rows)
        logger.info("%s: %d utterances, %.1f h", manifests[name], len(rows),
                    sum(row["duration"] for row in rows) / 3600)
    record.write()
    return manifests


def parse(argv):
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_folder", required=True, help="LibriSpeech (the split folders)")
    parser.add_argument("--output", required=True, help="manifests/ and prep/ go here")
    parser.add_argument("--train_set", default="100", choices=sorted(TRAIN_SETS))
    parser.add_argument("--valid_split", default="dev-clean", choices=SPLITS)
    parser.add_argument("--test_split", default="test-clean", choices=SPLITS)
    add_chain_arguments(parser, Path(__file__).parent / "hparams" / "prep.yaml",
                        lm_text="librispeech-lm-norm.txt (default: train transcripts)",
                        jobs=os.cpu_count() or 1)
    return parser.parse_args(argv)


def main(argv):
    """Manifests, then the KD chain; prints and returns ``prep.json``'s content."""
    args = parse(argv)
    logging.basicConfig(level=logging.INFO)
    init_distributed({})  # under torchrun: the ranks share the chain's sharded steps
    output = Path(args.output)
    manifests = main_first(prepare_librispeech, args.data_folder, output / "manifests",
                           args.train_set, args.valid_split, args.test_split)
    if args.lm_text is None:
        logger.info("No --lm_text: the unit LMs learn from the %s-hour training transcripts "
                    "only; librispeech-lm-norm.txt (openslr.org/11) gives them 40M sentences",
                    args.train_set)
    return run_chain(manifests, output / "prep", args)


if __name__ == "__main__":
    from sb_crossmodal_kd.cli import run_reporting_errors

    run_reporting_errors(main, sys.argv[1:], sys.argv[0])
    finish_process()  # reached on success only: under torchrun, exit without gloo's teardown
