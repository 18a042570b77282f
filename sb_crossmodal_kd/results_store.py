"""Copies the text results of a finished output folder into a folder under version control.

    python -m sb_crossmodal_kd.results_store OUTPUT results/study [--commit SHA] [--command CMD]

copies the result files of ``OUTPUT`` (an ``sbkd demo --study``, ``--scaling`` or ``sbkd
ablation`` folder) to ``results/study`` at the same relative paths: the driver's
``ablation.json`` / ``scaling.json`` and ``.md``, every run's ``run.json`` (its settings, valid
curve, test WER/CER, seed and commit), the study's decoding rows (``decoding.json``, ``.md``,
each model's ``decoding.json``) and the data records (``prep.json``, ``corpus.json``).
Nothing else: no audio, no checkpoints, no caches. The top-level result gets ``provenance``:
the commit it ran at and the command (by default those the driver recorded in ``ran``).
"""

import argparse
import json
import sys
from pathlib import Path

from sb_crossmodal_kd.io import atomic_write_json, atomic_write_text

__all__ = ["RESULT_FILES", "STORED_NAMES", "store_results"]

RESULT_FILES = ("ablation.json", "scaling.json")  # what a finished driver leaves at the top
STORED_NAMES = frozenset(RESULT_FILES + ("ablation.md", "scaling.md", "run.json", "prep.json",
                                         "corpus.json", "decoding.json", "decoding.md",
                                         "lm.json"))
_SKIPPED_FOLDERS = frozenset({"save"})  # SpeechBrain's checkpoints


def _stored_files(folder):
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if (path.is_file() and path.name in STORED_NAMES
                and not _SKIPPED_FOLDERS & set(relative.parts[:-1])):
            yield relative


def store_results(folder, destination, commit=None, command=None):
    """Copies the result files of ``folder`` to ``destination``; returns the relative paths.

    Arguments
    ---------
    folder : str or Path
        A finished output folder (with ``ablation.json`` or ``scaling.json``).
    destination : str or Path
        Where the copies go (e.g. ``results/study``); files already there are replaced.
    commit, command : str, optional
        The commit the results were made at and the command; default: the driver's record.

    Example
    -------
    >>> import json, tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp())
    >>> run = out / "runs" / "am_alone" / "1986"
    >>> (run / "save" / "CKPT+1").mkdir(parents=True)
    >>> _ = (run / "save" / "CKPT+1" / "model.ckpt").write_bytes(b"weights")
    >>> _ = (run / "run.json").write_text('{"wer": 30.0}')
    >>> _ = (out / "ablation.json").write_text(json.dumps({"ran": {"commit": "abc",
    ...                                                     "command": "sbkd demo"}}))
    >>> dest = pathlib.Path(tempfile.mkdtemp()) / "study"
    >>> [str(path) for path in store_results(out, dest)]
    ['ablation.json', 'runs/am_alone/1986/run.json']
    >>> json.loads((dest / "ablation.json").read_text())["provenance"]
    {'command': 'sbkd demo', 'commit': 'abc'}
    """
    folder, destination = Path(folder), Path(destination)
    tops = [name for name in RESULT_FILES if (folder / name).is_file()]
    if not tops:
        raise FileNotFoundError(f"{folder} has no {' or '.join(RESULT_FILES)}: not a finished "
                                "study, ablation or scaling folder")
    top = tops[-1]  # a scaling folder's summary (its sizes hold ablations of their own)
    result = json.loads((folder / top).read_text())
    ran = result.get("ran") or {}
    commit = commit or ran.get("commit")
    command = command or ran.get("command")
    if not commit or not command:
        raise ValueError(f"{folder / top} records no {'commit' if not commit else 'command'}: "
                         "give --commit SHA and --command CMD")
    files = list(_stored_files(folder))
    for relative in files:
        if relative != Path(top):
            atomic_write_text(destination / relative, (folder / relative).read_text())
    result["provenance"] = {"commit": commit, "command": command}
    atomic_write_json(destination / top, result)
    return files


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a finished output folder")
    parser.add_argument("destination", help="e.g. results/study or results/scaling")
    parser.add_argument("--commit", help="the commit it ran at (default: the one it recorded)")
    parser.add_argument("--command", help="the command it ran (default: the one it recorded)")
    args = parser.parse_args(argv)
    files = store_results(args.folder, args.destination, args.commit, args.command)
    print(f"Stored {len(files)} files of {args.folder} in {args.destination}")


if __name__ == "__main__":
    from sb_crossmodal_kd.cli import run_reporting_errors

    sys.exit(run_reporting_errors(main, sys.argv[1:], "results_store"))
