"""The ``sbkd`` command line: thin wrappers over library functions.

Each subcommand lives in a module of :mod:`sb_crossmodal_kd.commands` that defines
``add_arguments(parser)``, ``run(args)`` and a one-line module docstring (the help text);
adding a subcommand means adding that module and its name to ``SUBCOMMANDS``.
"""

import argparse
import importlib
import sys

SUBCOMMANDS = [
    "corpus", "demo", "teacher-cache", "align", "build-tree", "export-units", "ablation",
    "export", "transcribe",
]


def build_parser():
    """Returns the ``sbkd`` argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="sbkd",
        description="Deep MoE encoders and hierarchical LM-to-AM distillation for SpeechBrain.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"sb_crossmodal_kd.commands.{name.replace('-', '_')}")
        help_text = (module.__doc__ or "").strip().splitlines()[0]
        sub = subparsers.add_parser(name, help=help_text, description=module.__doc__)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv=None):
    """Entry point of the ``sbkd`` console script."""
    args = build_parser().parse_args(argv)
    return args._run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
