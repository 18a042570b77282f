"""Export a trained CTC model (without its auxiliary heads) for SpeechBrain's EncoderASR.

The folder written loads with
``speechbrain.inference.ASR.EncoderASR.from_hparams(source=DIR)`` and with
``sbkd transcribe --model DIR FILE...``.
"""

import sys

from sb_crossmodal_kd.inference import export_asr


def add_arguments(parser):
    """Registers the run folder, output folder and overwrite options."""
    parser.add_argument("--run", required=True,
                        help="output folder of a training run (holds hyperparams.yaml and save/)")
    parser.add_argument("--output", required=True, help="folder to write the model to")
    parser.add_argument("--min-key", default="WER",
                        help="checkpoint meta key to minimise (default WER: the best valid WER)")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty folder that is not an earlier export "
                        "(files of the same names are replaced, others kept)")


def run(args):
    """Exports the run's best checkpoint and says how to use it."""
    try:
        record = export_asr(args.run, args.output, min_key=args.min_key, force=args.force)
    except (OSError, ValueError, RuntimeError) as error:  # what export_asr refuses, and why
        print(f"sbkd export: {error}", file=sys.stderr)
        return 2
    meta = record["checkpoint_meta"]
    score = f", {args.min_key} {meta[args.min_key]:.2f}" if args.min_key in meta else ""
    dropped = ", ".join(record["dropped_modules"]) or "none"
    print(f"Exported {record['checkpoint']}{score} to {args.output}: "
          f"{record['parameters']:,} parameters (left out: {dropped}).")
    print(f"Transcribe: sbkd transcribe --model {args.output} FILE.wav")
