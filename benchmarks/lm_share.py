"""Where the LM's share of the hierarchy could hide: temperature, head weights, LM text size.

In the study the hierarchy distilled from the unit LMs and the same heads on the aligned hard
labels (``hierarchy_no_lm``) reach the same WER, and the teachers are nearly one-hot on the
train positions (mean entropy 0.13 to 0.36 nats). This probe varies what decides how much
the LM can add beyond the alignment, each variant trained like the study of the time (18 epochs,
seed 1986 unless ``--seed``) on a prepared ablation folder, and compares the variants on
valid only:

- ``hierarchy_tau2``, ``hierarchy_tau4``: teachers and heads at temperature 2 and 4 (caches
  rebuilt at that temperature from the same LMs, Hinton's ``tau^2`` scaling on), softer
  targets that carry the LM's ranking of the other units;
- ``hierarchy_alpha1`` against ``hierarchy_no_lm_weight1``: every head's term at weight 1
  instead of 0.5, with and without the LM;
- ``hierarchy_text5k``: teachers trained on 5,000 LM sentences instead of the
  ``--prepared`` folder's (a second prepared folder, ``--prepared-small-text``, with the same
  corpus settings but ``n_text`` 5,000: same audio, units and alignments);
- ``hierarchy_layers_233`` against ``hierarchy_no_lm_layers_233``: the heads one layer
  deeper (senones on layer 2, monophones and subwords on 3), with and without the LM;

beside ``hierarchy`` and ``hierarchy_no_lm`` at the study's settings.

    python benchmarks/lm_share.py --prepared ABLATION_DIR --output RUNS [--jobs 2]
        trains the variants not yet in the results file (resumable: one line per variant)
        and appends each to benchmarks/results/lm_share.jsonl; a variant with no settings
        of its own is taken from the ablation driver's finished run in its prepared folder
        when there is one with the study's training;
    python benchmarks/lm_share.py --table
        prints the Markdown table README shows, from that file.
"""

import argparse
import json
import os
import sys
import time
from concurrent.futures import as_completed
from pathlib import Path

from sb_crossmodal_kd.ablation import (
    DEMO_TRAINING,
    condition_recipe,
    is_flat,
    last_quarter_gain,
)
from sb_crossmodal_kd.io import atomic_write_text
from sb_crossmodal_kd.revision import source_revision

RESULTS = Path(__file__).resolve().parent / "results" / "lm_share.jsonl"
SEED = 1986
UNITS = ("senone", "monophone", "subword")
VOCAB = {"subword": 40, "monophone": 40}

# The study's training when the probe ran (its stored runs were made with it); the study has
# trained 40 epochs since.
PROBE_TRAINING = {**DEMO_TRAINING, "number_of_epochs": 18}

# The heads one layer deeper where the 3-layer encoder allows: senones on 2, the others on 3.
LAYERS_233 = {"senone_layer": 2, "monophone_layer": 3, "subword_layer": 3}

# name: (condition, recipe overrides, teacher temperature or None, LM text: "full" or "5k")
VARIANTS = {
    "hierarchy": ("hierarchy", {}, None, "full"),
    "hierarchy_no_lm": ("hierarchy_no_lm", {}, None, "full"),
    "hierarchy_tau2": ("hierarchy", {"kd": {"scale_by_tau_squared": True}}, 2.0, "full"),
    "hierarchy_tau4": ("hierarchy", {"kd": {"scale_by_tau_squared": True}}, 4.0, "full"),
    "hierarchy_alpha1": ("hierarchy", {"heads": {f"{u}_alpha": 1.0 for u in UNITS}}, None,
                         "full"),
    "hierarchy_no_lm_weight1": ("hierarchy_no_lm",
                                {"heads": {f"{u}_loss_weight": 1.0 for u in UNITS}}, None,
                                "full"),
    "hierarchy_text5k": ("hierarchy", {}, None, "5k"),
    "hierarchy_layers_233": ("hierarchy", {"heads": LAYERS_233}, None, "full"),
    "hierarchy_no_lm_layers_233": ("hierarchy_no_lm", {"heads": LAYERS_233}, None, "full"),
}


def tau_prep_folder(prep, tau, output):
    """A prep folder whose teacher caches are built at ``tau`` from ``prep``'s LMs: every
    other entry is a link to ``prep``'s."""
    from sb_crossmodal_kd.teachers import load_teacher
    from sb_crossmodal_kd.teachers.cache import build_cache, utterances_from_unit_store

    folder = output / f"prep_tau{tau:g}"
    (folder / "caches").mkdir(parents=True, exist_ok=True)
    for entry in prep.iterdir():
        link = folder / entry.name
        if entry.name != "caches" and not link.exists():
            link.symlink_to(entry.resolve())
    for unit in UNITS:
        utterances, units_hash = utterances_from_unit_store(prep / "units" / "train.units", unit)
        build_cache(load_teacher(prep / "lm" / unit / "lm"), utterances,
                    folder / "caches" / f"{unit}_train", k=32, tau=tau, unit_type=unit,
                    tokenizer_hash=units_hash, progress=False, jobs=2)
    return folder


def teacher_statistics(prep, tau):
    """Mean entropy and top-1 probability of each cache of ``prep`` (at ``tau``)."""
    from sb_crossmodal_kd.prep.record import senone_count
    from sb_crossmodal_kd.teachers.cache import TeacherCache

    sizes = {**VOCAB, "senone": senone_count(prep / "senone_tree.json")}
    return {unit: TeacherCache(prep / "caches" / f"{unit}_train", vocab_size=sizes[unit],
                               unit_type=unit, temperature=tau, k=32).statistics()
            for unit in UNITS}


def result_line(name, seed, prep, tau, results, train_s, commit, source):
    """One variant's results line from its run's results (test WER/CER, valid curve)."""
    condition, extra, _, text = VARIANTS[name]
    curve = results.get("valid_wer_curve", [])
    return {
        "variant": name, "condition": condition, "seed": seed, "teacher_tau": tau or 1.0,
        "lm_text": text, "overrides": extra, "valid_wer_curve": curve,
        "best_valid_wer": min(curve) if curve else None,
        "last_quarter_gain": last_quarter_gain(curve), "flat": is_flat(curve),
        "test_wer": results["wer"], "test_cer": results["cer"], "train_s": train_s,
        "teachers": None if condition == "hierarchy_no_lm" else teacher_statistics(prep, tau or 1.0),
        "commit": commit, "source": source,
    }


def train_variant(name, seed, data, prep, output, tau):
    """Trains and tests one variant; returns its results line."""
    from sb_crossmodal_kd.experiment import run_asr_experiment

    condition, extra, _, _ = VARIANTS[name]
    hparams_file, overrides = condition_recipe(condition)
    overrides = {**PROBE_TRAINING, **overrides, **extra, "seed": seed,
                 "data_folder": str(data), "prep_folder": str(prep),
                 "output_folder": str(output / name / str(seed))}
    if tau is not None:
        overrides.update({f"{unit}_tau": tau for unit in UNITS})
    start = time.time()
    results = run_asr_experiment(hparams_file, overrides, {"device": "cpu"})
    return result_line(name, seed, prep, tau, results, round(time.time() - start, 1),
                       source_revision(), "benchmarks/lm_share.py")


def adopted_run(name, seed, prepared):
    """The results line of ``name`` from a finished run of the ablation driver in
    ``prepared`` with the same settings (a variant with no overrides of its own), or None."""
    condition, extra, tau, _ = VARIANTS[name]
    record = Path(prepared) / "runs" / condition / str(seed) / "run.json"
    if extra or tau is not None or not record.is_file():
        return None
    run = json.loads(record.read_text())
    same = all(run.get("overrides", {}).get(key) == value for key, value in PROBE_TRAINING.items())
    if "wer" not in run or not same or run["overrides"].get("use_moe"):
        return None
    return result_line(name, seed, Path(prepared) / "prep", None, run, run["train_s"],
                       run["commit"], f"sbkd ablation run {condition}/{seed}")


def read_results(path=RESULTS):
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_result(line, path=RESULTS):
    lines = [json.dumps(entry) for entry in read_results(path)] + [json.dumps(line)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def run(prepared, small_text, output, names, jobs, seed=SEED):
    from sb_crossmodal_kd.workers import process_pool

    done = {(entry["variant"], entry["seed"]) for entry in read_results()}
    todo = [name for name in names if (name, seed) not in done]
    preps = {"full": Path(prepared) / "prep", "5k": Path(small_text) / "prep" if small_text
             else None}
    if any(VARIANTS[name][3] == "5k" for name in todo) and preps["5k"] is None:
        raise SystemExit("hierarchy_text5k needs --prepared-small-text (an ablation folder "
                         "prepared with n_text 5000)")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    jobs_args = []
    for name in todo:
        _, _, tau, text = VARIANTS[name]
        adopted = adopted_run(name, seed, preps[text].parent)
        if adopted:
            append_result(adopted)
            continue
        prep = preps[text]
        if tau is not None:
            prep = tau_prep_folder(prep, tau, output)
        jobs_args.append((name, seed, preps[text].parent / "data", prep, output, tau))
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    with process_pool(jobs, threads) as pool:
        futures = {pool.submit(train_variant, *args): args[0] for args in jobs_args}
        for future in as_completed(futures):
            line = future.result()
            append_result(line)
            print(json.dumps({key: line[key] for key in ("variant", "best_valid_wer",
                                                         "last_quarter_gain", "test_wer")}),
                  flush=True)


def table(entries):
    """The Markdown table of the probe's variants (valid first: choices are made on it)."""
    lines = ["| variant | seed | teacher τ | LM text | best valid WER % | valid gain, last ¼ "
             "| test WER % | teachers' mean entropy (nats) s/m/w |",
             "|---|---|---|---|---|---|---|---|"]
    for entry in entries:
        teachers = entry.get("teachers")
        entropy = ("-" if not teachers else
                   " / ".join(f"{teachers[unit]['mean_entropy']:.2f}" for unit in UNITS))
        gain = entry["last_quarter_gain"]
        lines.append(f"| {entry['variant']} | {entry['seed']} | {entry['teacher_tau']:g} "
                     f"| {entry['lm_text']} "
                     f"| {entry['best_valid_wer']:.2f} | {100 * gain:.1f} % "
                     f"| {entry['test_wer']:.2f} | {entropy} |")
    commits = sorted({entry["commit"] for entry in entries})
    lines += ["", f"The study's training of the time ({PROBE_TRAINING['number_of_epochs']} epochs) on its "
              f"data; run at commit {', '.join(commits)} by `python benchmarks/lm_share.py`."]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", help="a prepared ablation folder (data/, prep/)")
    parser.add_argument("--prepared-small-text", help="the same with n_text 5000")
    parser.add_argument("--output", help="folder of the variants' runs")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--table", action="store_true", help="print the table and stop")
    args = parser.parse_args(argv)
    if args.table:
        print(table(read_results()))
        return 0
    if not args.prepared or not args.output:
        parser.error("--prepared and --output are needed to train")
    run(args.prepared, args.prepared_small_text, args.output, args.variants, args.jobs,
        args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
