"""Transcribe audio files with an exported model; prints FILE<TAB>TRANSCRIPT per file.

Audio of another sample rate is resampled and multi-channel audio averaged to mono. A
file that cannot be read is reported on stderr; the others are still transcribed, and the
exit status is then 1. The model decodes as exported (greedy, or with its LM); ``--lm``
decodes with a word n-gram LM (ARPA file), ``--lm-weight``/``--beam``/``--word-bonus``
change the LM decoding settings and ``--greedy`` decodes without an LM. A model, LM or
setting that is refused stops it with exit status 2 before any file is decoded.
"""

import sys

from sb_crossmodal_kd.commands.export import add_lm_arguments, lm_settings
from sb_crossmodal_kd.inference import load_asr, transcribe_files


def add_arguments(parser):
    """Registers the model folder, the files, the device and the decoding options."""
    parser.add_argument("--model", required=True, help="folder written by `sbkd export`")
    parser.add_argument("files", nargs="+", metavar="FILE", help="audio files (WAV, FLAC, ...)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:0")
    add_lm_arguments(parser)
    parser.add_argument("--greedy", action="store_true",
                        help="greedy CTC decoding, without the model's LM")


def run(args):
    """Prints one line per file; returns 1 if any file could not be read."""
    try:
        asr = load_asr(args.model, device=args.device, lm=args.lm, greedy=args.greedy,
                       **lm_settings(args))
    except (OSError, ValueError) as error:  # no model; a missing, malformed or unfit LM
        print(f"sbkd transcribe: {error}", file=sys.stderr)
        return 2
    failed = 0
    for path, result in transcribe_files(asr, args.files):
        if isinstance(result, Exception):
            print(f"sbkd transcribe: {result}", file=sys.stderr)
            failed += 1
        else:
            print(f"{path}\t{result}", flush=True)
    return 1 if failed else 0
