#!/usr/bin/env python3
"""Prepares the KD data (units, alignments, senone tree, unit LMs, teacher caches) of your own
corpus from its SpeechBrain manifests.

    python manifest_prepare.py --train train.json --valid valid.csv --test test.csv \
        --lm_text lm_text.txt --output PREP [--settings hparams/prep.yaml] [--device cuda:0]

Manifests: CSV or JSON with ID, duration, wav, wrd (16 kHz audio; extra columns are kept).
``--data_root DIR`` fills ``$data_root`` (CSV) / ``{data_root}`` (JSON) in them. The LM text
is one sentence per line, written like the transcripts; without it the unit LMs train on the
train transcripts (logged). Then train a condition with
``python train.py hparams/kd.yaml --condition hierarchy --prep_folder PREP``.
"""

import argparse
import logging
import sys

from sb_crossmodal_kd.prep.recipes import add_chain_arguments, run_chain


def parse(argv):
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for split in ("train", "valid", "test"):
        parser.add_argument(f"--{split}", required=True, help=f"{split} manifest (CSV or JSON)")
    parser.add_argument("--lm_valid_text", help="held-out LM text (default: valid transcripts)")
    parser.add_argument("--output", required=True, help="the prep folder (PREP)")
    parser.add_argument("--data_root", help="fills $data_root / {data_root} in the manifests")
    add_chain_arguments(parser)
    return parser.parse_args(argv)


def main(argv):
    """Runs the KD chain on the manifests; prints and returns ``prep.json``'s content."""
    args = parse(argv)
    logging.basicConfig(level=logging.INFO)
    return run_chain(
        {"train": args.train, "valid": args.valid, "test": args.test}, args.output, args,
        lm_valid_text=args.lm_valid_text,
        replacements={"data_root": args.data_root} if args.data_root else None,
    )


if __name__ == "__main__":
    from sb_crossmodal_kd.cli import run_reporting_errors

    run_reporting_errors(main, sys.argv[1:], sys.argv[0])
