"""The alignment source options ``sbkd build-tree`` and ``sbkd export-units`` share.

Either ``--shards DIR``, the shards folder ``sbkd align`` writes (``OUTPUT/<name>_shards``),
streamed shard by shard (memory bounded whatever the corpus size, ``--jobs`` processes), or
``--alignments FILE``, a one-document ``*_phone_alignments.json``, loaded whole.

Example
-------
>>> import argparse
>>> parser = argparse.ArgumentParser()
>>> add_alignment_source(parser)
>>> _ = parser.add_argument("--jobs", type=int, default=1)
>>> check_alignment_source(parser.parse_args(["--shards", "out/train_shards", "--jobs", "2"]))
>>> check_alignment_source(parser.parse_args(["--alignments", "a.json", "--jobs", "2"]))
Traceback (most recent call last):
...
ValueError: --jobs 2 runs shards in parallel: give the shards folder (--shards ...
"""

from sb_crossmodal_kd.sharding import check_jobs


def add_alignment_source(parser, which=""):
    """Registers ``--shards`` / ``--alignments`` (exactly one of them required).

    Arguments
    ---------
    parser : argparse.ArgumentParser
        The subcommand's parser.
    which : str
        Added to both helps, e.g. ``"of the train split"``: which split's alignments.
    """
    which = f" {which}" if which else ""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--shards", default=None,
        help=f"shards folder{which} written by `sbkd align` (OUTPUT/<name>_shards): read "
             "shard by shard, memory bounded whatever the corpus size; every shard is checked "
             "first (a missing, cut-short or other-settings one is refused)")
    source.add_argument(
        "--alignments", default=None,
        help=f"one-document *_phone_alignments.json{which} instead: loaded into memory whole, "
             "for small corpora")


def check_alignment_source(args):
    """Refuses, before any work, a ``--jobs`` that is not a positive integer, or above 1
    without ``--shards`` (the one-document file is read in one process)."""
    check_jobs(args.jobs)
    if args.jobs > 1 and not args.shards:
        raise ValueError(f"--jobs {args.jobs} runs shards in parallel: give the shards folder "
                         "(--shards OUTPUT/<name>_shards) instead of --alignments")
