"""Build the senone decision tree from phone alignments and the audio's features.

Give the shards folder ``sbkd align`` writes (``--shards OUTPUT/<name>_shards``): its
triphone-state statistics are computed shard by shard (in ``--jobs`` processes) and added in
shard order, as the prep chain does, so memory stays bounded whatever the corpus size, and the
tree is the same bytes for any ``--jobs``. Every shard is checked first: one missing, cut
short or from other settings is refused (re-run ``sbkd align`` on the same output to rebuild
exactly those), never mixed in. ``--alignments FILE`` reads a one-document
``*_phone_alignments.json`` instead, loaded into memory whole (for small corpora).
"""

import os

from sb_crossmodal_kd.alignment.corpus import load_alignments, read_manifest, tree_statistics
from sb_crossmodal_kd.alignment.forced import PhoneAligner
from sb_crossmodal_kd.commands.alignment_source import (
    add_alignment_source,
    check_alignment_source,
)
from sb_crossmodal_kd.commands.pronunciation import add_pronunciation_options
from sb_crossmodal_kd.units.lexicon import Lexicon
from sb_crossmodal_kd.units.senones import SenoneTree


def add_arguments(parser):
    """Registers the alignment source, manifest, aligner (for its features) and tree settings."""
    add_alignment_source(parser, "of the train split")
    parser.add_argument("--manifest", required=True, help="the manifest those alignments cover")
    parser.add_argument("--aligner", required=True, help="aligner.pt written by `sbkd align`")
    add_pronunciation_options(parser)
    parser.add_argument("--text-key", default="wrd",
                        help="transcript column (the one `sbkd align` was given)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="processes computing the shards' statistics (with --shards)")
    parser.add_argument("--output", required=True, help="tree JSON to write")
    parser.add_argument("--max-leaves", type=int, default=500, help="most senones")
    parser.add_argument("--min-count", type=int, default=50, help="fewest frames per leaf")
    parser.add_argument("--min-gain", type=float, default=100.0, help="smallest split gain")


def run(args):
    """Accumulates triphone-state statistics, grows the tree and saves it."""
    check_alignment_source(args)
    lexicon = Lexicon.load(args.lexicon, oov_policy=args.oov_policy)
    aligner = PhoneAligner.load(args.aligner, lexicon)  # another lexicon's is refused here
    stats = _shard_statistics(args) if args.shards else _document_statistics(args, lexicon,
                                                                             aligner)
    tree = SenoneTree.build(stats, args.max_leaves, args.min_count, args.min_gain)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tree.save(args.output)
    print(f"{args.output}: {tree.num_senones} senones, depth {tree.depth}, from "
          f"{stats.frames} frames of {len(stats.stats)} triphone states ({tree.hash})")


def _shard_statistics(args):
    """The statistics of ``--shards``, shard by shard (the prep chain's function)."""
    from sb_crossmodal_kd.alignment.sharded import open_shards, split_tree_statistics

    alignments = open_shards(args.shards, args.manifest, args.aligner, args.lexicon,
                             args.oov_policy, args.text_key)
    return split_tree_statistics(alignments, args.manifest, args.aligner, args.lexicon,
                                 args.oov_policy, args.jobs, args.text_key)


def _document_statistics(args, lexicon, aligner):
    """The statistics of the one-document ``--alignments`` file (read whole)."""
    _, alignments = load_alignments(args.alignments, lexicon.hash)
    rows = read_manifest(args.manifest, args.text_key)
    return tree_statistics(alignments, rows, aligner.features,
                           aligner.settings.frame_rate.sample_rate)
