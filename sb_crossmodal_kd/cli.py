"""The ``sbkd`` command line: thin wrappers over library functions.

Each subcommand lives in a module of :mod:`sb_crossmodal_kd.commands` that defines
``add_arguments(parser)``, ``run(args)`` and a one-line module docstring (the help text);
adding a subcommand means adding that module and its name to ``SUBCOMMANDS``.
"""

import argparse
import importlib
import os
import sys

SUBCOMMANDS = [
    "corpus", "demo", "teacher-cache", "align", "build-tree", "export-units", "ablation",
    "export", "transcribe",
]


def package_version():
    """The installed distribution's version (``unknown`` when run from a tree never installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sb-crossmodal-kd")
    except PackageNotFoundError:
        return "unknown"


def build_parser():
    """Returns the ``sbkd`` argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="sbkd",
        description="Deep MoE encoders and hierarchical LM-to-AM distillation for SpeechBrain.",
    )
    parser.add_argument("--version", action="version", version=f"sbkd {package_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"sb_crossmodal_kd.commands.{name.replace('-', '_')}")
        help_text = (module.__doc__ or "").strip().splitlines()[0]
        sub = subparsers.add_parser(name, help=help_text, description=module.__doc__)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv=None):
    """Runs ``sbkd`` with ``argv``; errors are raised (:func:`console` reports them)."""
    args = build_parser().parse_args(argv)
    return args._run(args) or 0


# What the package raises for bad input or settings (manifests, lexicons, caches, folders made
# with other settings, missing files); a bug's RuntimeError or TypeError keeps its traceback.
USER_ERRORS = (ValueError, KeyError, OSError)


def run_reporting_errors(function, argv, prog):
    """Calls ``function(argv)``; an error of :data:`USER_ERRORS` becomes one line on stderr
    (``PROG: error: ...``) and exit status 2, as argparse reports a bad option.
    Ctrl-C ends with ``PROG: interrupted`` and status 130, as a shell reports it: every file
    is written atomically, so what was finished is kept and a rerun of the resumable commands
    (``demo``, ``ablation``) goes on from it. ``SBKD_TRACEBACK=1`` shows the traceback
    instead. For command-line entry points."""
    try:
        return function(argv)
    except USER_ERRORS as error:
        if os.environ.get("SBKD_TRACEBACK"):
            raise
        plain_key_error = type(error) is KeyError and error.args
        message = error.args[0] if plain_key_error else str(error)
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if os.environ.get("SBKD_TRACEBACK"):
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)


def console():
    """Entry point of the ``sbkd`` console script."""
    argv = sys.argv[1:]
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    prog = f"sbkd {command}" if command in SUBCOMMANDS else "sbkd"
    return run_reporting_errors(main, argv, prog)


if __name__ == "__main__":
    sys.exit(console())
