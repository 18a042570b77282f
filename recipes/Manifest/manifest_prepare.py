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
import json
import logging
import sys

from sb_crossmodal_kd.pipeline import prep_settings_file, prepare_kd_data_from_manifests


def parse(argv):
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for split in ("train", "valid", "test"):
        parser.add_argument(f"--{split}", required=True, help=f"{split} manifest (CSV or JSON)")
    parser.add_argument("--lm_text", help="text for the unit LMs, one sentence per line")
    parser.add_argument("--lm_valid_text", help="held-out LM text (default: valid transcripts)")
    parser.add_argument("--output", required=True, help="the prep folder (PREP)")
    parser.add_argument("--settings", help="yaml of data-chain settings (prep_settings keys)")
    parser.add_argument("--data_root", help="fills $data_root / {data_root} in the manifests")
    parser.add_argument("--device", default="cpu", help="where teachers fill their caches")
    return parser.parse_args(argv)


def main(argv):
    """Runs the KD chain on the manifests; prints and returns ``prep.json``'s content."""
    args = parse(argv)
    logging.basicConfig(level=logging.INFO)
    prepared = prepare_kd_data_from_manifests(
        {"train": args.train, "valid": args.valid, "test": args.test},
        args.output,
        lm_text=args.lm_text,
        settings=prep_settings_file(args.settings),
        lm_valid_text=args.lm_valid_text,
        replacements={"data_root": args.data_root} if args.data_root else None,
        progress=True,
        device=args.device,
    )
    print(json.dumps({"steps_s": prepared["steps"], **prepared["outputs"]}))
    return prepared


if __name__ == "__main__":
    from sb_crossmodal_kd.cli import run_reporting_errors

    run_reporting_errors(main, sys.argv[1:], sys.argv[0])
