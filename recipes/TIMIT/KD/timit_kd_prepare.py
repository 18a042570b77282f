#!/usr/bin/env python3
"""TIMIT for the KD conditions: ``../timit_prepare.py``'s manifests, then the KD data chain
(forced alignment, senone tree, tokenizer, unit stores, unit LMs, teacher caches).

    python timit_kd_prepare.py --data_folder /path/to/TIMIT --output OUT \
        [--lm_text TEXT] [--settings hparams/prep.yaml] [--device cuda:0]

writes ``OUT/manifests/`` (everything ``timit_prepare.py`` writes) and the KD data in
``OUT/prep``; then ``python train.py hparams/kd.yaml --condition NAME --prep_folder OUT/prep``.

Without ``--lm_text`` the unit LMs learn from the train transcripts only (TIMIT has no text
corpus of its own; its train and test sentences are disjoint, so nothing of the test leaks).
A larger text must leave out the core test sentences.

The monophone level is force-aligned from the transcripts like any corpus: the data chain
(:func:`sb_crossmodal_kd.pipeline.prepare_kd_data_from_manifests`) takes no external
alignment. ``OUT/manifests/{split}_phone_alignments.json`` holds TIMIT's hand segmentation in
the aligner's format for the day it does.
"""

import argparse
import importlib.util
import logging
import sys
from pathlib import Path

from sb_crossmodal_kd.prep.recipes import add_chain_arguments, run_chain

logger = logging.getLogger(__name__)

TIMIT_PREPARE = Path(__file__).resolve().parents[1] / "timit_prepare.py"


def load_timit_prepare():
    """``../timit_prepare.py`` as a module (recipes are not packages)."""
    spec = importlib.util.spec_from_file_location("timit_prepare", TIMIT_PREPARE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_folder", required=True, help="TIMIT (holding TRAIN and TEST)")
    parser.add_argument("--output", required=True, help="manifests/ and prep/ go here")
    parser.add_argument("--include_sa", action="store_true", help="keep the SA sentences")
    add_chain_arguments(parser, Path(__file__).parent / "hparams" / "prep.yaml")
    return parser.parse_args(argv)


def main(argv):
    args = parse(argv)
    logging.basicConfig(level=logging.INFO)
    output = Path(args.output)
    manifests = load_timit_prepare().prepare_timit(args.data_folder, output / "manifests",
                                                   include_sa=args.include_sa)
    if args.lm_text is None:
        logger.info("No --lm_text: the unit LMs learn from TIMIT's train transcripts only")
    return run_chain(manifests, output / "prep", args)


if __name__ == "__main__":
    main(sys.argv[1:])
