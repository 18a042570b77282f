"""The forced aligner's phone model trained by 1 process and by N ranks: wall time, speedup
and whether every run ends with the same weights; prints one JSON line.

Four ways, alternated, each a fresh process (or ``torchrun``) running this script in
``--worker`` mode on the first ``--train-utterances`` train utterances of the corpus:

- ``one``: one process, one torch thread (the baseline);
- ``threads``: one process, N torch threads (what one process gets from more cores);
- ``torchrun``: ``torchrun --nproc_per_node=N``, one thread per rank;
- ``jobs``: one process given ``jobs=N`` (``sbkd align --jobs N``, the data chain's
  ``--jobs``), which trains on N ranks it starts on this machine, one thread each.

The ranks share the gradient steps (each batch's ``batch_parts`` parts) and the alignments
(shards of utterances); their weights must be the same bytes as one process's. ``seconds`` is the
training call's time (features included; the ranks' start included for ``jobs``, not for
``torchrun``, whose ranks start before it), the median over ``--repeats``. The weights are
compared by digest with ``one``'s (``threads`` may round differently: more threads may sum
in another order). On one machine
the ranks share its cores: a speedup is bounded by the free cores.

Usage::

    python benchmarks/phone_model_ranks.py --corpus /tmp/synthcommands [--ranks 2]
    python benchmarks/phone_model_ranks.py --table RESULTS.json   # the Markdown table of
                                                                   # a file of such lines
"""

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def _worker(args):
    import torch

    from sb_crossmodal_kd.alignment.corpus import read_manifest
    from sb_crossmodal_kd.alignment.forced import AlignerSettings, PhoneAligner
    from sb_crossmodal_kd.distributed import init_distributed, rank
    from sb_crossmodal_kd.units.lexicon import Lexicon

    torch.set_num_threads(args.threads)
    init_distributed({})
    rows = read_manifest(os.path.join(args.corpus, "train.csv"))[: args.train_utterances]
    aligner = PhoneAligner(Lexicon.load(None, oov_policy="g2p"),
                           AlignerSettings(batch_parts=args.batch_parts))
    start = time.perf_counter()
    report = aligner.train([(r["ID"], r["wav"], r["wrd"]) for r in rows], progress=False,
                           jobs=args.jobs)
    seconds = time.perf_counter() - start
    state = aligner.state()
    digest = hashlib.sha256()
    for name, value in sorted(state["model"].items()):
        digest.update(name.encode() + value.numpy().tobytes())
    digest.update(state["log_prior"].numpy().tobytes())
    with open(os.path.join(args.worker, f"rank{rank()}.json"), "w") as handle:
        json.dump({"seconds": seconds, "weights_sha256": digest.hexdigest(),
                   "audio_seconds": report["audio_seconds"],
                   "phase_seconds": report["phase_seconds"]}, handle)


WAYS = ("one", "threads", "torchrun", "jobs")


def _run(args, way):
    """One training the ``way`` named (:data:`WAYS`): rank 0's report and every rank's
    weights digest."""
    n = args.ranks
    with tempfile.TemporaryDirectory() as out:
        worker = [__file__, "--corpus", args.corpus, "--worker", out,
                  "--train-utterances", str(args.train_utterances),
                  "--batch-parts", str(args.batch_parts)]
        threads, jobs, ranks = {"one": (1, 1, 1), "threads": (n, 1, 1), "torchrun": (1, 1, n),
                                "jobs": (1, n, 1)}[way]
        worker += ["--threads", str(threads), "--jobs", str(jobs)]
        if way == "torchrun":
            # --standalone: torchrun finds a free local port itself
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc_per_node={ranks}", *worker]
        else:
            command = [sys.executable, *worker]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        reports = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(ranks)]
    return reports[0], {r["weights_sha256"] for r in reports}


def markdown(results):
    """The table of a results file (``{"runs": [line, ...]}``): each way's speedup over one
    process with one thread, and its seconds."""
    n = results["runs"][0]["n"]
    header = {"threads": f"one process, {n} threads", "torchrun": f"{n} ranks, `torchrun`",
              "jobs": f"`--jobs {n}` (ranks started included)"}
    lines = ["| utterances (audio) | one process, 1 thread | " + " | ".join(header.values()) + " |",
             "|---" * (2 + len(header)) + "|"]
    for run in results["runs"]:
        cells = [f"{run['speedup_vs_one'][way]:.2f}x ({run['seconds'][way]:.1f} s)"
                 for way in header]
        lines.append(f"| {run['train_utterances']:,} ({run['audio_seconds'] / 60:.0f} min) | "
                     f"{run['seconds']['one']:.1f} s | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", help="a SynthCommands folder (train.csv)")
    parser.add_argument("--table", help="print the Markdown table of this results file")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--train-utterances", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--jobs", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--batch-parts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args)
    if args.table:
        with open(args.table) as handle:
            print(markdown(json.load(handle)))
        return None
    if not args.corpus:
        parser.error("--corpus is required to measure")

    seconds, digests, phases = {way: [] for way in WAYS}, {way: set() for way in WAYS}, {}
    for _ in range(args.repeats):
        for way in WAYS:
            report, found = _run(args, way)
            seconds[way].append(report["seconds"])
            digests[way] |= found
            phases[way] = report["phase_seconds"]
            audio = report["audio_seconds"]
    median = {way: statistics.median(seconds[way]) for way in WAYS}
    print(json.dumps({
        "train_utterances": args.train_utterances,
        "audio_seconds": round(audio, 1),
        "batch_parts": args.batch_parts,
        "n": args.ranks,
        "seconds": {way: round(median[way], 2) for way in WAYS},
        "speedup_vs_one": {way: round(median["one"] / median[way], 2) for way in WAYS[1:]},
        "phase_seconds": phases,
        # every run and rank of a way the one weights digest, and that of "one"
        "same_weights_as_one": {way: digests[way] == digests["one"] and len(digests["one"]) == 1
                                for way in WAYS[1:]},
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
