"""Monophone forced alignment of manifests: train a flat-start phone model, Viterbi-align, report OOVs.

Each manifest is aligned shard by shard (``OUTPUT/<name>_shards/``, kept for a re-run) in
``--jobs`` processes, or under ``torchrun`` by every rank its shards (the phone model trains
on every rank, or on ``--jobs`` ranks of this machine, sharing its gradient steps), then merged into ``OUTPUT/<name>_phone_alignments.json``: the same bytes however
many processes aligned it. ``sbkd build-tree --shards`` and ``sbkd export-units --shards``
read that shards folder one shard at a time (memory bounded whatever the corpus size); each
line printed names it.
"""

import dataclasses
import json
import os

from sb_crossmodal_kd.alignment.corpus import read_manifest
from sb_crossmodal_kd.alignment.forced import AlignerSettings, PhoneAligner
from sb_crossmodal_kd.alignment.sharded import align_split
from sb_crossmodal_kd.commands.pronunciation import add_pronunciation_options
from sb_crossmodal_kd.distributed import init_distributed, main_decides, rank, rank_device
from sb_crossmodal_kd.io import atomic_write_text
from sb_crossmodal_kd.sharding import check_jobs
from sb_crossmodal_kd.units.lexicon import Lexicon, oov_report


def add_arguments(parser):
    """Registers the manifests, output folder, OOV policy and aligner settings."""
    parser.add_argument("--train", required=True, help="manifest to train the phone model on")
    parser.add_argument(
        "--manifests", nargs="+", required=True,
        help="manifests to align (name.csv -> OUTPUT/name_shards/, what build-tree and "
             "export-units --shards read, and OUTPUT/name_phone_alignments.json)",
    )
    parser.add_argument("--output", required=True, help="folder for alignments and reports")
    add_pronunciation_options(parser)
    parser.add_argument("--text-key", default="wrd", help="transcript column")
    parser.add_argument("--jobs", type=int, default=1,
                        help="processes training the phone model and aligning shards (per "
                             "rank under torchrun, for the shards)")
    parser.add_argument("--device", default="cpu",
                        help="where the phone model trains and runs: cpu, cuda (under torchrun "
                             "each rank's own GPU) or cuda:N; features and Viterbi use the CPU")
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
    check_jobs(args.jobs)
    init_distributed({})
    os.makedirs(args.output, exist_ok=True)
    lexicon = Lexicon.load(args.lexicon, oov_policy=args.oov_policy)
    aligner_path = args.aligner or os.path.join(args.output, "aligner.pt")
    if args.aligner:
        PhoneAligner.load(args.aligner, lexicon)  # another lexicon's is refused before any work
    else:
        _train(args, lexicon, aligner_path)
    main = rank() == 0
    summary = {}
    for manifest in args.manifests:
        name = os.path.splitext(os.path.basename(manifest))[0]
        rows = read_manifest(manifest, args.text_key)
        oov = oov_report(lexicon, [(r["ID"], r[args.text_key]) for r in rows],
                         os.path.join(args.output, f"{name}_oov.txt") if main else None)
        shards = os.path.join(args.output, f"{name}_shards")
        _, report = align_split(
            aligner_path, manifest, shards, args.lexicon,
            args.oov_policy, args.jobs, args.text_key,
            document=os.path.join(args.output, f"{name}_phone_alignments.json"),
            header={"manifest": os.path.abspath(manifest)}, device=args.device,
        )
        summary[name] = {"oov": oov, "alignment": report}
        if main:
            print(f"{name}: aligned {report['aligned']}/{report['utterances']} "
                  f"({report['audio_s']:.0f} s of audio in {report['seconds']:.0f} s, "
                  f"{report['audio_s_per_s']:.0f} audio s/s, {report['shards_built']} shards "
                  f"built); OOV rate {oov['oov_rate']:.4f} ({oov['oov_tokens']} tokens, "
                  f"{oov['oov_types']} types: {oov['list']}); shards in {shards}")
    if main:
        atomic_write_text(os.path.join(args.output, "align_report.json"),
                          json.dumps(summary, indent=1))


def _train(args, lexicon, path):
    """Trains the phone model on ``--train`` (every rank) and saves it to ``path`` (rank 0)."""
    settings = AlignerSettings(**{
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(AlignerSettings) if f.name != "frame_rate"
    })
    rows = read_manifest(args.train, args.text_key)[: args.train_utterances]
    aligner = PhoneAligner(lexicon, settings, rank_device(args.device))
    info = aligner.train([(r["ID"], r["wav"], r[args.text_key]) for r in rows],
                         progress=rank() == 0, jobs=args.jobs)
    main_decides(aligner.save, path)  # the others go on once it is there
    if rank() == 0:
        print(f"phone model: {info['utterances']} utterances, {info['frames']} frames, "
              f"{info['seconds']:.0f} s, losses {[round(v, 3) for v in info['losses']]}")
