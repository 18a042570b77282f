"""Export a trained CTC model (without its auxiliary heads) for SpeechBrain's EncoderASR.

The folder written loads with
``speechbrain.inference.ASR.EncoderASR.from_hparams(source=DIR)`` and with
``sbkd transcribe --model DIR FILE...``; with ``--lm LM.arpa`` (a word n-gram LM, e.g. from
``sb_crossmodal_kd.decoding.train_ngram``) it decodes with CTC beam search and that LM.
"""

import sys

from sb_crossmodal_kd.inference import export_asr


def add_lm_arguments(parser):
    """Registers ``--lm`` and the LM decoding settings (shared with ``sbkd transcribe``)."""
    parser.add_argument("--lm", metavar="ARPA",
                        help="word n-gram LM (ARPA file, .gz allowed) to decode with: CTC beam "
                        "search with shallow fusion")
    parser.add_argument("--lm-weight", type=float, default=None,
                        help="weight of the LM's log-probabilities (default 0.5)")
    parser.add_argument("--word-bonus", type=float, default=None, dest="word_insertion_bonus",
                        help="score added per word (default 0)")
    parser.add_argument("--beam", type=int, default=None, dest="beam_width",
                        help="hypotheses kept per frame (default 32)")


def lm_settings(args):
    """The LM decoding settings given on the command line (unset ones left out)."""
    return {key: getattr(args, key) for key in ("lm_weight", "word_insertion_bonus", "beam_width")
            if getattr(args, key) is not None}


def add_arguments(parser):
    """Registers the run folder, output folder, overwrite and LM options."""
    parser.add_argument("--run", required=True,
                        help="output folder of a training run (holds hyperparams.yaml and save/)")
    parser.add_argument("--output", required=True, help="folder to write the model to")
    parser.add_argument("--min-key", default="WER",
                        help="checkpoint meta key to minimise (default WER: the best valid WER)")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty folder that is not an earlier export "
                        "(files of the same names are replaced, others kept)")
    add_lm_arguments(parser)


def run(args):
    """Exports the run's best checkpoint and says how to use it."""
    try:
        record = export_asr(args.run, args.output, min_key=args.min_key, force=args.force,
                            lm=args.lm, lm_settings=lm_settings(args))
    except (OSError, ValueError, RuntimeError) as error:  # what export_asr refuses, and why
        print(f"sbkd export: {error}", file=sys.stderr)
        return 2
    meta = record["checkpoint_meta"]
    score = f", {args.min_key} {meta[args.min_key]:.2f}" if args.min_key in meta else ""
    dropped = ", ".join(record["dropped_modules"]) or "none"
    print(f"Exported {record['checkpoint']}{score} to {args.output}: "
          f"{record['parameters']:,} parameters (left out: {dropped}).")
    if record["lm"]:
        lm = record["lm"]
        print(f"Decodes with the {lm['order']}-gram LM {lm['source']} (LM weight "
              f"{lm['lm_weight']}, word bonus {lm['word_insertion_bonus']}, beam "
              f"{lm['beam_width']}).")
    print(f"Transcribe: sbkd transcribe --model {args.output} FILE.wav")
