"""Export a split's unit store: phone, senone and subword sequences with encoder-frame alignments.

Give the shards folder ``sbkd align`` writes (``--shards OUTPUT/<name>_shards``): each shard's
part of the store is built (in ``--jobs`` processes, ``OUTPUT.parts/`` until the store is
written) and appended in shard order, as the prep chain does, so memory stays bounded whatever
the corpus size, and the store is the same bytes for any ``--jobs`` and the same as from the
one-document file. Every shard is checked first against the manifest and ``--aligner``: one
missing, cut short or from other settings is refused (re-run ``sbkd align`` on the same output
to rebuild exactly those), never mixed in. ``--alignments FILE`` reads a one-document
``*_phone_alignments.json`` instead, loaded into memory whole (for small corpora).
"""

from pathlib import Path

from sb_crossmodal_kd.alignment.corpus import export_units, load_alignments, read_manifest
from sb_crossmodal_kd.alignment.framerate import FrameRate
from sb_crossmodal_kd.commands.alignment_source import (
    add_alignment_source,
    check_alignment_source,
)
from sb_crossmodal_kd.commands.pronunciation import add_pronunciation_options
from sb_crossmodal_kd.units.lexicon import Lexicon
from sb_crossmodal_kd.units.senones import SenoneTree
from sb_crossmodal_kd.units.subwords import PretrainedTokenizerUnits, SentencePieceUnits


def add_arguments(parser):
    """Registers inputs (alignments, manifest, tree, tokenizer) and the output store."""
    add_alignment_source(parser)
    parser.add_argument("--manifest", required=True, help="the manifest those alignments cover")
    parser.add_argument("--aligner", default=None,
                        help="with --shards: the aligner.pt they were aligned with (default: "
                             "aligner.pt next to the shards folder, where `sbkd align` writes "
                             "it)")
    parser.add_argument("--output", required=True, help="unit store file to write")
    add_pronunciation_options(parser)
    parser.add_argument("--text-key", default="wrd",
                        help="transcript column (the one `sbkd align` was given)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="processes building the shards' parts of the store (with --shards)")
    parser.add_argument("--tree", default=None, help="senone tree JSON (adds senones)")
    parser.add_argument("--spm-dir", default=None,
                        help="SentencePiece folder (trained there if absent; adds subwords)")
    parser.add_argument("--spm-vocab-size", type=int, default=500)
    parser.add_argument("--spm-train-text", default=None,
                        help="text file to train SentencePiece on (default: the manifest)")
    parser.add_argument("--hf-tokenizer", default=None,
                        help="local transformers tokenizer folder instead of SentencePiece")
    parser.add_argument("--mode", choices=["majority", "centre"], default="majority",
                        help="how 10 ms labels become encoder-frame labels")
    parser.add_argument("--strides", type=int, nargs="+", default=[2, 2],
                        help="front-end strided blocks (4x subsampling by default)")


def run(args):
    """Builds the unit streams of every aligned utterance and writes the store."""
    check_alignment_source(args)
    lexicon = Lexicon.load(args.lexicon, oov_policy=args.oov_policy)
    alignments = _open_shards(args) if args.shards else None  # refused before any work
    tree = SenoneTree.load(args.tree) if args.tree else None
    options = (lexicon.hash, tree, _tokenizer(args), _frame_rate(args), args.mode,
               args.text_key)
    if alignments is not None:
        from sb_crossmodal_kd.alignment.sharded import export_split_units

        report = export_split_units(args.output, alignments, args.manifest, *options,
                                    jobs=args.jobs)
    else:
        _, records = load_alignments(args.alignments, lexicon.hash)
        report = export_units(args.output, records, read_manifest(args.manifest, args.text_key),
                              *options)
    print(f"{args.output}: {report['utterances']} utterances "
          f"({len(report['missing'])} without alignment)")


def _tokenizer(args):
    """The subword tokenizer of ``--hf-tokenizer`` or ``--spm-dir`` (trained if absent)."""
    if args.hf_tokenizer:
        return PretrainedTokenizerUnits(args.hf_tokenizer)
    if args.spm_dir:
        return SentencePieceUnits(
            args.spm_dir, args.spm_vocab_size,
            csv_file=None if args.spm_train_text else args.manifest,
            text_file=args.spm_train_text,
        )
    return None


def _frame_rate(args):
    """The encoder's frame rate of ``--strides`` (kernel 3, no dilation per strided block)."""
    return FrameRate(strides=tuple(args.strides), kernel_sizes=(3,) * len(args.strides),
                     dilations=(1,) * len(args.strides))


def _open_shards(args):
    """``--shards``, checked against the manifest and the aligner (``--aligner``, or the
    ``aligner.pt`` ``sbkd align`` wrote next to the shards folder)."""
    from sb_crossmodal_kd.alignment.sharded import open_shards

    aligner = args.aligner or Path(args.shards).parent / "aligner.pt"
    if not Path(aligner).is_file():
        raise ValueError(f"{aligner}: no aligner there; give --aligner, the aligner.pt the "
                         f"shards of {args.shards} were aligned with")
    return open_shards(args.shards, args.manifest, aligner, args.lexicon, args.oov_policy,
                       args.text_key)
