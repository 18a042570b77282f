"""The sharded data chain's speed, memory and disk on two corpus sizes; prints one JSON line.

For each size (``--hours``, default about 1 h and 5 h of SynthCommands train audio, at
``--utterances-per-hour`` utterances an hour, measured on the corpus itself and reported):

1. the corpus (:func:`~sb_crossmodal_kd.data.corpus.make_corpus`, train split only matters);
2. one phone model for both sizes (trained once on the first ``--aligner-utterances`` train
   utterances of the smaller corpus; not a timed step here: its cost grows with the
   utterances it trains on, not with the corpus. ``benchmarks/phone_model_ranks.py`` times
   it with 1 process, N threads, N ``torchrun`` ranks and ``--jobs N``);
3. the sharded steps of the chain on the train split, each in a fresh process (so its peak
   resident memory is its own: ``resource.getrusage`` of that process and of its workers),
   with 1 and with 2 processes (``--jobs``):
   ``align`` (:func:`~sb_crossmodal_kd.alignment.sharded.align_split`),
   ``tree_statistics`` (:func:`~sb_crossmodal_kd.alignment.sharded.split_tree_statistics`)
   and ``unit_store`` (:func:`~sb_crossmodal_kd.alignment.sharded.export_split_units`);
   each reports ``audio_s_per_s`` (train audio seconds per wall second) and ``peak_rss_mb``;
   and ``lm_text``, the unit LMs' text to monophone ids
   (:func:`~sb_crossmodal_kd.teachers.text_shards.convert_sharded`, CMUdict with its
   letter-to-sound fallback) on the corpus's text-only LM sentences, ``--lm-sentences-per-hour``
   of them an audio hour (LibriSpeech's ratio: about 40 M sentences of LM text for 960 h),
   reporting ``sentences_per_s``, ``words_per_s`` and ``peak_rss_mb``;
4. ``chain``: the four again, from scratch, in one process inside
   :func:`~sb_crossmodal_kd.workers.shared_workers`, as the data chain runs them (its workers
   start once and keep the lexicon and aligner they loaded; each step above pays that
   start-up on its own): ``steps_s`` per part and ``audio_s_per_s`` of the whole.

``cpu_speedup_2_processes`` calibrates the machine: a pure-Python loop in 2 spawned processes
against 1, measured before and after the steps (2.0 on two free cores; less where other work
shares them, and then ``speedup_2_jobs`` cannot reach its target whatever the chain does).

Then: ``peak_rss_ratio_5h_vs_1h`` (per step and the largest, 1 process; target <= 1.2),
``speedup_2_jobs`` (per step and for the chain, larger corpus: 1-process time / 2-process
time; target >= 1.7 on 2 free cores), ``speedup_2_jobs_in_chain`` (per part of the chain), ``bytes_per_audio_hour`` of the alignment shards, the one-document
alignments and the unit store, and ``projection_librispeech_960h``: wall hours per step and
disk on N processes (N free cores), the LM text's at
``librispeech-lm-norm.txt``'s 803 M words (at the measured words per second), assuming each process keeps the measured 1-process rate
times the chain's parallel efficiency relative to the calibration
(``speedup_2_jobs / cpu_speedup_2_processes``, at most 1): a projection, not a measurement.

Usage::

    nice python benchmarks/data_chain.py --work /tmp/chain_bench > chain.json
    nice python benchmarks/data_chain.py --work /tmp/chain_small --hours 0.02 0.1  # quick
    nice python benchmarks/data_chain.py --work /tmp/chain_bench \
        --store benchmarks/results/data_chain_cpu.json --command "..."  # commit the result
    python benchmarks/data_chain.py --table benchmarks/results/data_chain_cpu.json  # README
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

STEPS = ("align", "tree_statistics", "unit_store")
TEXT_STEPS = ("lm_text",)  # measured in sentences, not audio
CHAIN = "chain"  # the four in one process, as the data chain runs them: workers started once
LIBRISPEECH_HOURS = 960.0
# librispeech-lm-norm.txt, the LM text of LibriSpeech's recipes (Panayotov et al., 2015).
LIBRISPEECH_LM_WORDS = 803e6


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="folder for corpora and outputs")
    parser.add_argument("--table", help="print a stored result as the recipe README's tables")
    parser.add_argument("--hours", type=float, nargs=2, default=[1.0, 5.0],
                        help="the two corpus sizes, hours of train audio (approximate)")
    parser.add_argument("--utterances-per-hour", type=int, default=1150,
                        help="SynthCommands utterances an hour (the result reports the real)")
    parser.add_argument("--lm-sentences-per-hour", type=int, default=40_000,
                        help="text-only LM sentences per audio hour (LibriSpeech: about 40 M "
                             "for 960 h)")
    parser.add_argument("--aligner-utterances", type=int, default=100)
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--project-jobs", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--store", help="also write the result (with --command) to this file")
    parser.add_argument("--command", default=None, help="how it was run, stored with --store")
    parser.add_argument("--step", choices=STEPS + TEXT_STEPS + (CHAIN,),
                        help=argparse.SUPPRESS)  # a child process
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--run-jobs", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.table:
        print(markdown(json.loads(Path(args.table).read_text())))
        return
    if not args.work:
        parser.error("--work is required")
    if args.step:
        print(json.dumps(run_step(args.step, Path(args.work), Path(args.corpus), args.run_jobs)))
        return
    work = Path(args.work).resolve()
    sizes = {f"{h:g}h": h for h in args.hours}
    corpora = {name: corpus(work / f"corpus_{name}", round(h * args.utterances_per_hour),
                            round(h * args.lm_sentences_per_hour))
               for name, h in sizes.items()}
    aligner(work, corpora[next(iter(sizes))], args.aligner_utterances)
    calibration = [cpu_speedup_2_processes()]
    results = {}
    for name, folder in corpora.items():
        audio_s = audio_seconds(folder / "train.csv")
        entry = {"utterances": count_rows(folder / "train.csv"), "audio_h": audio_s / 3600,
                 "steps": {}}
        for jobs in args.jobs:
            out = work / f"out_{name}_jobs{jobs}"
            for step in STEPS + TEXT_STEPS + (CHAIN,):
                measured = child(step, out, folder, jobs, work)
                if step in STEPS + (CHAIN,):
                    measured["audio_s_per_s"] = round(audio_s / measured["seconds"], 1)
                entry["steps"].setdefault(step, {})[f"jobs{jobs}"] = measured
        out = work / f"out_{name}_jobs{args.jobs[0]}"
        hours = audio_s / 3600
        entry["bytes_per_audio_hour"] = {
            "alignment_shards": round(folder_bytes(out / "train_shards") / hours),
            "alignment_document": round((out / "train_phone_alignments.json").stat().st_size
                                        / hours),
            "unit_store": round((out / "train.units").stat().st_size / hours),
        }
        entry["utterances_per_hour"] = round(entry["utterances"] / hours)
        results[name] = entry
    calibration.append(cpu_speedup_2_processes())
    result = summary(results, list(sizes), args.jobs, args.project_jobs, calibration)
    if args.store:
        from sb_crossmodal_kd.io import atomic_write_json

        atomic_write_json(args.store, {**result, "command": args.command})
    print(json.dumps(result))


def summary(results, names, jobs, project_jobs, calibration):
    small, large = (results[name] for name in names)
    one, two = f"jobs{jobs[0]}", f"jobs{jobs[-1]}"
    ratio = {step: round(large["steps"][step][one]["peak_rss_mb"]
                         / small["steps"][step][one]["peak_rss_mb"], 3)
             for step in STEPS + TEXT_STEPS}
    speedup = {step: round(large["steps"][step][one]["seconds"]
                           / large["steps"][step][two]["seconds"], 2)
               for step in STEPS + TEXT_STEPS + (CHAIN,) if step in large["steps"]}
    in_chain = {}
    if CHAIN in large["steps"]:
        parts = (large["steps"][CHAIN][one]["steps_s"], large["steps"][CHAIN][two]["steps_s"])
        in_chain = {step: round(parts[0][step] / parts[1][step], 2) for step in parts[0]}
    machine = sum(calibration) / len(calibration)
    efficiency = {step: min(1.0, speedup[step] / machine) for step in STEPS + TEXT_STEPS}
    # What each step has to do for LibriSpeech, in the unit its rate is measured in.
    work = {**{step: ("audio_s_per_s", LIBRISPEECH_HOURS * 3600) for step in STEPS},
            "lm_text": ("words_per_s", LIBRISPEECH_LM_WORDS)}
    projection = {}
    for n in project_jobs:
        hours = {}
        for step, (unit, amount) in work.items():
            rate = large["steps"][step][one][unit] * (1 if n == 1 else n * efficiency[step])
            hours[step] = round(amount / rate / 3600, 2)
        projection[f"jobs{n}"] = {"wall_h": hours, "total_wall_h": round(sum(hours.values()), 2)}
    projection["disk_gb"] = {kind: round(per_hour * LIBRISPEECH_HOURS / 1e9, 2)
                             for kind, per_hour in large["bytes_per_audio_hour"].items()}
    return {
        "corpora": results,
        "peak_rss_ratio_5h_vs_1h": {**ratio, "max": max(ratio.values())},
        "speedup_2_jobs": speedup,
        "speedup_2_jobs_in_chain": in_chain,
        "cpu_speedup_2_processes": calibration,
        "parallel_efficiency_vs_calibration": {k: round(v, 2) for k, v in efficiency.items()},
        "projection_librispeech_960h": projection,
        "cpu_count": os.cpu_count(),
        "sizes": names,
    }


def markdown(result):
    """The measured table and the LibriSpeech projection of a result, as Markdown."""
    names = result["sizes"]
    lines = ["| step | " + " | ".join(f"{n} audio s/s, {j}" for n in names
                                         for j in ("1 process", "2 processes"))
             + " | peak RSS MB (1 process) " + " / ".join(names) + " | speedup 2 processes |",
             "|---" * (2 + 2 * len(names) + 1) + "|"]
    for step in STEPS:
        cells = [str(result["corpora"][n]["steps"][step][j]["audio_s_per_s"])
                 for n in names for j in ("jobs1", "jobs2")]
        rss = " / ".join(str(result["corpora"][n]["steps"][step]["jobs1"]["peak_rss_mb"])
                         for n in names)
        lines.append(f"| {step} | " + " | ".join(cells)
                     + f" | {rss} | {result['speedup_2_jobs'][step]} |")
    if CHAIN in result["speedup_2_jobs"]:
        cells = [str(result["corpora"][n]["steps"][CHAIN][j]["audio_s_per_s"])
                 for n in names for j in ("jobs1", "jobs2")]
        rss = " / ".join(str(result["corpora"][n]["steps"][CHAIN]["jobs1"]["peak_rss_mb"])
                         for n in names)
        parts = ", ".join(f"{step} {value}" for step, value
                          in result["speedup_2_jobs_in_chain"].items())
        lines.append(f"| the four in one chain ({parts}) | " + " | ".join(cells)
                     + f" | {rss} | {result['speedup_2_jobs'][CHAIN]} |")
    large = result["corpora"][names[-1]]
    corpora = ", ".join(f"{n}: {result['corpora'][n]['utterances']} utterances, "
                        f"{result['corpora'][n]['audio_h']:.2f} h" for n in names)
    lines += ["", f"Corpora: {corpora}. Peak RSS ratio {names[-1]} / {names[0]}: "
              f"{result['peak_rss_ratio_5h_vs_1h']['max']}. The machine's own 2-process "
              f"speedup (pure Python): {result['cpu_speedup_2_processes']}.", "",
              "| store | bytes per audio hour |", "|---|---|"]
    lines += [f"| {kind} | {size:,} |" for kind, size in large["bytes_per_audio_hour"].items()]
    projection = result["projection_librispeech_960h"]
    runs = sorted((key for key in projection if key.startswith("jobs")), key=lambda k: int(k[4:]))
    lines += ["", "Projection (not measured) for LibriSpeech 960 h, wall hours:", "",
              "| step | " + " | ".join(f"{k[4:]} processes" for k in runs) + " |",
              "|---" * (1 + len(runs)) + "|"]
    for step in projection[runs[0]]["wall_h"]:
        lines.append(f"| {step} | " + " | ".join(str(projection[k]["wall_h"][step])
                                                   for k in runs) + " |")
    lines.append("| total | " + " | ".join(str(projection[k]["total_wall_h"]) for k in runs)
                 + " |")
    for step in TEXT_STEPS:
        if step not in large["steps"]:  # a result stored before the step was measured
            continue
        rates = " / ".join(str(result["corpora"][n]["steps"][step][j]["words_per_s"])
                           for n in names for j in ("jobs1", "jobs2"))
        counts = ", ".join(f"{result['corpora'][n]['steps'][step]['jobs1']['sentences']:,} "
                           f"sentences ({n})" for n in names)
        rss = " / ".join(str(result["corpora"][n]["steps"][step]["jobs1"]["peak_rss_mb"])
                         for n in names)
        lines += ["", f"{step} (the unit LMs' text to monophones; {counts}): {rates} words/s "
                  f"({', '.join(names)}; 1 / 2 processes each), peak RSS {rss} MB "
                  f"(1 process), speedup 2 processes {result['speedup_2_jobs'][step]}; "
                  "projected at librispeech-lm-norm.txt's 803 M words."]
    disk = ", ".join(f"{kind} {gb} GB" for kind, gb in projection["disk_gb"].items())
    lines += ["", f"Disk (projection, train 960 h): {disk}."]
    return "\n".join(lines)


def _spin(n):
    start = time.time()
    total = 0
    for i in range(n):
        total += i
    return time.time() - start


def cpu_speedup_2_processes(n=20_000_000):
    """How much faster 2 spawned processes do two pieces of pure-Python work than 1 does."""
    import multiprocessing

    one = _spin(n)
    start = time.time()
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(_spin, [n, n])
    return round(2 * one / (time.time() - start), 2)


def corpus(folder, n_train, n_text):
    from sb_crossmodal_kd.data.corpus import make_corpus

    make_corpus(folder, progress=False, jobs=os.cpu_count() or 1, n_train=n_train, n_valid=4,
                n_test=4, n_text=n_text, n_text_valid=10)
    return folder


def aligner(work, corpus_folder, n):
    """The phone model every size is aligned with (trained once)."""
    from sb_crossmodal_kd.alignment.corpus import read_manifest
    from sb_crossmodal_kd.alignment.forced import AlignerSettings, PhoneAligner
    from sb_crossmodal_kd.units.lexicon import Lexicon

    path = work / "aligner.pt"
    if not path.is_file():
        lexicon = Lexicon.load(None, oov_policy="g2p")
        model = PhoneAligner(lexicon, AlignerSettings(iterations=1, epochs=1))
        rows = read_manifest(corpus_folder / "train.csv")[:n]
        model.train([(r["ID"], r["wav"], r["wrd"]) for r in rows], progress=False)
        model.save(path)
    return path


def child(step, out, corpus_folder, jobs, work):
    """Runs one step in a fresh process; its seconds and peak resident memory."""
    command = [sys.executable, __file__, "--work", str(work), "--corpus", str(corpus_folder),
               "--step", step, "--run-jobs", str(jobs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=work)
    if done.returncode:
        raise SystemExit(f"step {step} (jobs {jobs}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_step(step, work, corpus_folder, jobs):
    """One step on the corpus's train split, outputs in ``work/out_<size>_jobs<N>``."""
    import torch

    from sb_crossmodal_kd.alignment.sharded import (
        align_split,
        export_split_units,
        split_tree_statistics,
    )
    from sb_crossmodal_kd.units.lexicon import Lexicon
    from sb_crossmodal_kd.units.senones import SenoneTree

    torch.set_num_threads(1)
    size = corpus_folder.name.removeprefix("corpus_")
    out = work / f"out_{size}_jobs{jobs}"
    out.mkdir(parents=True, exist_ok=True)
    manifest, aligner_path = corpus_folder / "train.csv", work / "aligner.pt"
    lexicon = Lexicon.load(None, oov_policy="g2p")
    before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.time()
    extra = {}
    if step == CHAIN:
        extra = chain_steps(out / CHAIN, manifest, aligner_path, lexicon, work / f"spm_{size}",
                            jobs)
    elif step == "lm_text":
        extra, start = lm_text_step(out, manifest, jobs)
    elif step == "align":
        import shutil

        shutil.rmtree(out / "train_shards", ignore_errors=True)  # timed from scratch
        align_split(aligner_path, manifest, out / "train_shards", jobs=jobs,
                    document=out / "train_phone_alignments.json")
    else:
        alignments, _ = align_split(aligner_path, manifest, out / "train_shards", jobs=1)
        start = time.time()  # (checking the finished shards is not this step's time)
        if step == "tree_statistics":
            stats = split_tree_statistics(alignments, manifest, aligner_path, jobs=jobs)
            SenoneTree.build(stats, max_leaves=500, min_count=50, min_gain=100.0).save(
                out / "tree.json")
        else:
            from sb_crossmodal_kd.prep.steps import _tokenizer

            tree = SenoneTree.load(out / "tree.json")
            # The chain's tokenizer (fitted down where the transcripts cannot make 100 pieces).
            tokenizer = _tokenizer(work / f"spm_{size}", manifest, 100, fit=True)
            start = time.time()
            export_split_units(out / "train.units", alignments, manifest, lexicon.hash, tree,
                               tokenizer, jobs=jobs)
    seconds = time.time() - start
    if step == CHAIN:  # its parts only (not the tokenizer loaded before them)
        seconds = sum(extra["steps_s"].values())
    own_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(max(own_kb, workers_kb) / 1024, 1),
            # The lexicon (CMUdict and its letter-to-sound table) is most of a process's memory.
            "peak_rss_before_step_mb": round(before_kb / 1024, 1),
            "peak_rss_workers_mb": round(workers_kb / 1024, 1), **extra}


def chain_steps(out, manifest, aligner_path, lexicon, spm_folder, jobs):
    """Alignment, tree statistics (and the tree), unit store and LM text from scratch in one
    process sharing its workers, as the data chain runs them: each part's seconds."""
    import shutil

    from sb_crossmodal_kd.alignment.sharded import (
        align_split,
        export_split_units,
        split_tree_statistics,
    )
    from sb_crossmodal_kd.prep.steps import _tokenizer
    from sb_crossmodal_kd.units.senones import SenoneTree
    from sb_crossmodal_kd.workers import shared_workers

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tokenizer = _tokenizer(spm_folder, manifest, 100, fit=True)  # made by the unit_store step
    seconds = {}
    with shared_workers():
        start = time.time()
        alignments, _ = align_split(aligner_path, manifest, out / "train_shards", jobs=jobs)
        seconds["align"] = time.time() - start
        start = time.time()
        stats = split_tree_statistics(alignments, manifest, aligner_path, jobs=jobs)
        tree = SenoneTree.build(stats, max_leaves=500, min_count=50, min_gain=100.0)
        seconds["tree_statistics"] = time.time() - start
        start = time.time()
        export_split_units(out / "train.units", alignments, manifest, lexicon.hash, tree,
                           tokenizer, jobs=jobs)
        seconds["unit_store"] = time.time() - start
        start = time.time()
        lm_text_step(out, manifest, jobs)
        seconds["lm_text"] = time.time() - start
    return {"steps_s": {step: round(value, 2) for step, value in seconds.items()}}


def lm_text_step(out, manifest, jobs):
    """The corpus's text-only LM sentences (beside its ``manifest``) converted to monophones
    from scratch; the counts, and when the timed part started (after the converter is made)."""
    import shutil

    from sb_crossmodal_kd.teachers.text_shards import convert_sharded
    from sb_crossmodal_kd.units.types import TextUnits

    text = Path(manifest).parent / "lm_text" / "train.txt"
    with open(text) as lines:
        words = sum(len(line.split()) for line in lines)
    units = TextUnits.from_files("monophone", oov_policy="g2p")
    shutil.rmtree(out / "lm_text_units", ignore_errors=True)  # timed from scratch
    start = time.time()
    # Shards of 5,000 lines: several for every process at both sizes.
    sequences, skipped = convert_sharded(text, units, out / "lm_text_units", jobs=jobs,
                                         shard_size=5000)
    seconds = max(time.time() - start, 1e-9)
    return {"sentences": len(sequences), "words": words, "skipped_oov": skipped,
            "sentences_per_s": round(len(sequences) / seconds, 1),
            "words_per_s": round(words / seconds, 1)}, start


def audio_seconds(manifest):
    import csv

    with open(manifest, newline="") as f:
        return sum(float(row["duration"]) for row in csv.DictReader(f))


def count_rows(manifest):
    with open(manifest) as f:
        return sum(1 for _ in f) - 1


def folder_bytes(folder):
    return sum(p.stat().st_size for p in Path(folder).iterdir())


if __name__ == "__main__":
    main()
