"""README's results tables, generated from the result files committed in benchmarks/results.

    python benchmarks/readme_tables.py --store DEMO_OUTPUT --commit SHA --command "sbkd demo"
        copies DEMO_OUTPUT/ablation.json (a finished `sbkd demo` or `sbkd ablation` folder)
        to benchmarks/results/demo_ablation.json with the commit it ran at and the command;
    python benchmarks/readme_tables.py
        prints the Markdown that README shows: the condition table, each run's valid WER
        curve, and the teachers table, all from benchmarks/results/demo_ablation.json.
"""

import argparse
import json
import sys
from pathlib import Path

from sb_crossmodal_kd.ablation import markdown_table, teacher_table
from sb_crossmodal_kd.io import atomic_write_json

STORE = Path(__file__).resolve().parent / "results" / "demo_ablation.json"


def store(folder, commit, command):
    result = json.loads((Path(folder) / "ablation.json").read_text())
    result["provenance"] = {"commit": commit, "command": command}
    atomic_write_json(STORE, result)


def tables(result):
    summary = {name: result["conditions"][name] for name in result["condition_order"]}
    seeds = result["seeds"]
    lines = [markdown_table(summary, seeds), "Valid WER % after each epoch:", ""]
    for name, entry in summary.items():
        for seed, run in entry["per_seed"].items():
            curve = " ".join(f"{w:.1f}" for w in run.get("valid_wer_curve", []))
            lines.append(f"- {name} (seed {seed}): {curve}")
    lines += ["", teacher_table(result.get("teachers", {}))]
    provenance = result.get("provenance", {})
    if provenance:
        wall = result.get("wall_s")
        lines.append(f"Run at commit {provenance['commit']} by `{provenance['command']}`"
                     + (f", {wall / 60:.1f} min wall" if wall else "")
                     + f" (data chain {result['prep_s']:.0f} s).")
    return "\n".join(lines) + "\n"


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", help="a finished demo or ablation output folder")
    parser.add_argument("--commit", help="the commit it ran at")
    parser.add_argument("--command", default="sbkd demo")
    args = parser.parse_args(argv)
    if args.store:
        if not args.commit:
            parser.error("--store needs --commit")
        store(args.store, args.commit, args.command)
    print(tables(json.loads(STORE.read_text())), end="")


if __name__ == "__main__":
    main(sys.argv[1:])
