"""Make the embedded SynthCommands speech corpus (eSpeak NG speech, manifests, LM text)."""

import argparse
import dataclasses
import os

from sb_crossmodal_kd.data.corpus import CorpusSettings, make_corpus


def add_arguments(parser):
    """Registers ``--output`` and one option per corpus setting."""
    parser.add_argument("--output", required=True, help="folder to write the corpus into")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="processes synthesising side by side (the corpus is the same "
                             "whatever this is; default: one per CPU core)")
    for field in dataclasses.fields(CorpusSettings):
        if field.name == "speakers":
            parser.add_argument(
                "--speakers", type=int, nargs=3, default=list(field.default),
                metavar=("TRAIN", "VALID", "TEST"), help="speakers per split (disjoint)",
            )
        else:
            parser.add_argument(
                f"--{field.name}", type=field.type,
                default=field.default, help=f"default {field.default}",
            )


def run(args):
    """Makes the corpus and prints where its manifests are."""
    settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(CorpusSettings)}
    settings["speakers"] = tuple(settings["speakers"])
    paths = make_corpus(args.output, jobs=args.jobs, **settings)
    for name, path in paths.items():
        print(f"{name}: {path}")


def main(argv=None):
    """Stand-alone entry point (used by the recipe's prepare script)."""
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    run(parser.parse_args(argv))
