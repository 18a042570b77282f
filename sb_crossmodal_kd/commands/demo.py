"""Run the main job: every distillation condition on the embedded corpus, one table."""

import json
import os

from sb_crossmodal_kd.demo import convergence_note, default_output, run_demo
from sb_crossmodal_kd.revision import invoked_command


def add_arguments(parser):
    """Registers the demo's options."""
    parser.add_argument("--output", default=None,
                        help="output folder (default sbkd_demo, sbkd_long, sbkd_study or "
                        "sbkd_scaling); "
                        "re-running resumes it")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--long", action="store_true",
                       help="the demo's conditions, corpus and teachers trained twice as "
                       "long (40 epochs): the reference the demo is read against (about half "
                       "an hour per seed on 2 CPU cores)")
    which.add_argument("--study", action="store_true",
                       help="the study: 8 dense conditions and 2 MoE, 3 seeds, 40 epochs, "
                       "the full LM text, instead of the 15-minute demo (hours)")
    which.add_argument("--scaling", action="store_true",
                       help="the scaling study: am_alone, hierarchy and hierarchy_no_lm on "
                       "150, 600 and 2,400 paired train utterances, 3 seeds (hours)")
    parser.add_argument("--paired", default=None,
                        help="with --scaling: train-set sizes, e.g. 150,600,2400")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds per condition (default 1, or 3 with --study / --scaling)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="processes at once, each with cpu_count // jobs threads: runs "
                        "side by side, and the unit LMs beside the runs that need no teacher "
                        "(default: one per core)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:0")


def run(args):
    """Runs (or resumes) the preset and prints its Markdown table."""
    from sb_crossmodal_kd.scaling import parse_paired

    preset = next((name for name in ("long", "study", "scaling") if getattr(args, name)),
                  "demo")
    if args.paired is not None and preset != "scaling":
        raise ValueError("--paired goes with --scaling")
    paired = parse_paired(args.paired) if args.paired is not None else None
    output = args.output or default_output(preset)
    result = run_demo(output, preset=preset, seeds=args.seeds, jobs=args.jobs,
                      device=args.device, paired=paired, command=invoked_command("demo"))
    table = "scaling.md" if preset == "scaling" else "ablation.md"
    with open(f"{output}/{table}", encoding="utf-8") as handle:
        print(handle.read())
    if preset == "study":
        with open(f"{output}/decoding.md", encoding="utf-8") as handle:
            print(handle.read())
    if preset == "demo" and convergence_note(result):
        print(convergence_note(result))
    print(f"Wall time {result['wall_s']:.0f} s. Results: {output}/{table} "
          f"({table.replace('.md', '.json')}, {table.replace('.md', '.png')} beside it)")
    print(json.dumps({"wall_s": result["wall_s"], "prep_s": result.get("prep_s")}))
