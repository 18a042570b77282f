"""The forced aligner's phone model trained by 1 and by N ``torchrun`` ranks: wall time,
speedup and whether every rank ends with the same weights; prints one JSON line.

The ranks share the gradient steps (each batch's ``batch_parts`` parts) and the alignments
(shards of utterances); the weights must be the same bytes for any number of ranks. Each
measurement is a fresh ``torchrun --nproc_per_node=R`` of this script in ``--worker`` mode
on the first ``--train-utterances`` train utterances of the corpus, ``--threads`` torch
threads per rank; ``seconds`` is the training's own time on rank 0 (features included,
start-up not), the median over ``--repeats`` runs, 1 and N ranks alternated. On one machine
the ranks share its cores: ``speedup`` is bounded by the free cores.

Usage::

    python benchmarks/phone_model_ranks.py --corpus /tmp/synthcommands [--ranks 2]
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
    report = aligner.train([(r["ID"], r["wav"], r["wrd"]) for r in rows], progress=False)
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


def _run(args, ranks):
    """One torchrun of the worker on ``ranks`` ranks: rank 0's report and every rank's
    weights digest."""
    with tempfile.TemporaryDirectory() as out:
        # --standalone: torchrun finds a free local port itself
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={ranks}", __file__, "--corpus", args.corpus, "--worker", out,
                   "--train-utterances", str(args.train_utterances),
                   "--threads", str(args.threads), "--batch-parts", str(args.batch_parts)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
        reports = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(ranks)]
    return reports[0], {r["weights_sha256"] for r in reports}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="a SynthCommands folder (train.csv)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--train-utterances", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--batch-parts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args)

    seconds, digests, phases = {1: [], args.ranks: []}, set(), {}
    for _ in range(args.repeats):
        for ranks in (1, args.ranks):
            report, found = _run(args, ranks)
            seconds[ranks].append(report["seconds"])
            digests |= found
            phases[ranks] = report["phase_seconds"]
            audio = report["audio_seconds"]
    one, many = (statistics.median(seconds[r]) for r in (1, args.ranks))
    print(json.dumps({
        "train_utterances": args.train_utterances,
        "audio_seconds": round(audio, 1),
        "batch_parts": args.batch_parts,
        "threads_per_rank": args.threads,
        "ranks": args.ranks,
        "seconds_1_rank": round(one, 2),
        f"seconds_{args.ranks}_ranks": round(many, 2),
        "speedup": round(one / many, 2),
        "phase_seconds_1_rank": phases[1],
        f"phase_seconds_{args.ranks}_ranks": phases[args.ranks],
        "same_weights_every_rank_and_run": len(digests) == 1,
        "cpu_count": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
