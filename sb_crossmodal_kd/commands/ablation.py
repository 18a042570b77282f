"""Run the distillation ablation (every condition, paired seeds) and print its table."""

import json
import time
from pathlib import Path

from sb_crossmodal_kd.ablation import CONDITIONS, run_ablation
from sb_crossmodal_kd.io import atomic_write_json
from sb_crossmodal_kd.revision import invoked_command, run_context


def add_arguments(parser):
    """Registers the output folder, seeds, conditions and size options."""
    parser.add_argument("--output", default="sbkd_ablation",
                        help="output folder (default sbkd_ablation); re-running resumes it")
    parser.add_argument("--seeds", type=int, default=1,
                        help="seeds per condition, the same for every condition (default 1)")
    parser.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=None,
                        metavar="CONDITION",
                        help=f"subset to run (default all): {', '.join(CONDITIONS)}")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs of every run (default: the demo's)")
    parser.add_argument("--training", default=None,
                        help='more recipe overrides as JSON, e.g. \'{"d_model": 144}\'')
    parser.add_argument("--prep", default=None,
                        help='data-chain settings as JSON, e.g. \'{"corpus": {"n_train": 1200}}\'')
    parser.add_argument("--device", default="cpu", help="cpu or cuda:0")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained side by side (e.g. 2 on a 2-core CPU)")


def run(args):
    """Runs (or resumes) the ablation and prints the Markdown table."""
    from sb_crossmodal_kd.ablation import DEMO_TRAINING

    training = dict(DEMO_TRAINING)
    training.update(json.loads(args.training) if args.training else {})
    if args.epochs is not None:
        training["number_of_epochs"] = args.epochs
    start = time.time()
    result = run_ablation(args.output, seeds=args.seeds, conditions=args.conditions,
                          prep=json.loads(args.prep) if args.prep else None,
                          training=training, device=args.device, jobs=args.jobs, progress=True)
    # Where it ran, as `sbkd demo` records it (wall time of this call: the remainder, when
    # it resumed a folder).
    result["wall_s"] = round(time.time() - start, 1)
    result["ran"] = run_context(invoked_command("ablation"), args.device)
    atomic_write_json(Path(args.output) / "ablation.json", result)
    with open(f"{args.output}/ablation.md", encoding="utf-8") as handle:
        print(handle.read())
