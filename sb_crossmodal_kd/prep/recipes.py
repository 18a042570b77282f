"""What the recipes' prepare scripts share: the data chain's command-line options, and the
chain run with them on the manifests a script has written.

Example
-------
>>> import argparse
>>> parser = argparse.ArgumentParser()
>>> add_chain_arguments(parser, settings="hparams/prep.yaml")
>>> parser.parse_args(["--device", "cuda:0", "--jobs", "4"])
Namespace(lm_text=None, settings='hparams/prep.yaml', device='cuda:0', jobs=4)
"""

import json

from sb_crossmodal_kd.distributed import rank
from sb_crossmodal_kd.prep.chain import prepare_kd_data_from_manifests
from sb_crossmodal_kd.prep.settings import prep_settings_file

__all__ = ["add_chain_arguments", "run_chain"]


def add_chain_arguments(parser, settings=None,
                        lm_text="text for the unit LMs, one sentence per line "
                                "(default: the train transcripts)", jobs=1):
    """Adds ``--lm_text`` (help ``lm_text``), ``--settings`` (a yaml of
    :func:`~sb_crossmodal_kd.prep.settings.prep_settings` keys, default ``settings``; None:
    the defaults), ``--device`` and ``--jobs`` (default ``jobs``) to the ``argparse`` parser
    ``parser``."""
    parser.add_argument("--lm_text", help=lm_text)
    parser.add_argument("--settings", default=None if settings is None else str(settings),
                        help="yaml of data-chain settings, prep_settings keys (default: "
                             f"{'none, the defaults' if settings is None else settings})")
    parser.add_argument("--device", default="cpu",
                        help="where the unit LMs train and the teachers fill their caches")
    parser.add_argument("--jobs", type=int, default=jobs,
                        help="processes aligning, counting tree statistics and writing unit "
                             f"stores shard by shard (default {jobs}; the outputs do not "
                             "depend on it)")


def run_chain(manifests, prep_dir, args, **options):
    """Runs :func:`~sb_crossmodal_kd.prep.chain.prepare_kd_data_from_manifests` on
    ``manifests`` into ``prep_dir`` with the options of :func:`add_chain_arguments` in
    ``args`` (and ``options``, e.g. ``lm_valid_text``), showing progress; prints the steps'
    seconds and the outputs as one JSON line and returns ``prep.json``'s content."""
    prepared = prepare_kd_data_from_manifests(
        manifests, prep_dir, lm_text=args.lm_text, settings=prep_settings_file(args.settings),
        progress=True, device=args.device, jobs=args.jobs, **options,
    )
    if rank() == 0:  # under torchrun, once
        print(json.dumps({"steps_s": prepared["steps"], **prepared["outputs"]}))
    return prepared
