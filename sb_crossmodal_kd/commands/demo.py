"""Run the main job: every distillation condition on the embedded corpus, one table."""

import json
import os

from sb_crossmodal_kd.demo import run_demo


def add_arguments(parser):
    """Registers the demo's options."""
    parser.add_argument("--output", default="sbkd_demo",
                        help="output folder (default sbkd_demo); re-running resumes it")
    parser.add_argument("--study", action="store_true",
                        help="the study: every condition, dense and MoE, 3 seeds, instead of "
                        "the 15-minute demo")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds per condition (default 1, or 3 with --study)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="processes at once, each with cpu_count // jobs threads: runs "
                        "side by side, and the unit LMs beside the runs that need no teacher "
                        "(default: one per core)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:0")


def run(args):
    """Runs (or resumes) the demo and prints the Markdown table."""
    result = run_demo(args.output, study=args.study, seeds=args.seeds, jobs=args.jobs,
                      device=args.device)
    with open(f"{args.output}/ablation.md", encoding="utf-8") as handle:
        print(handle.read())
    print(f"Wall time {result['wall_s']:.0f} s (data {result['prep_s']:.0f} s). "
          f"Table: {args.output}/ablation.md, ablation.json, ablation.png")
    print(json.dumps({"wall_s": result["wall_s"], "prep_s": result["prep_s"]}))
