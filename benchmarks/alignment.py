"""Forced-alignment quality and speed on the embedded corpus; prints one JSON line.

Steps, all with the library the ``sbkd align`` / ``build-tree`` commands use:

1. the SynthCommands corpus in ``--corpus`` (made with default settings if absent);
2. CMUdict lexicon with the g2p OOV fallback; ``oov_rate`` = OOV word tokens / word tokens
   of the test transcripts (``oov_rate_train``: of the train transcripts);
3. the aligner's phone model (CTC start, then 3-state frame-level re-alignment rounds)
   trained on the first ``--train-utterances`` train utterances (``train_seconds``), on
   ``--device`` (the phone model there; features and Viterbi on the CPU);
4. Viterbi alignment of the test split (speakers unseen in training; ``--split valid`` for
   tuning), compared with the synthesiser's own word timings: every word start and end is a
   boundary; ``boundary_mae_ms`` (mean absolute error), ``boundary_median_ms``,
   ``within_20ms`` (share of boundaries within 20 ms; the classic forced-alignment yardstick,
   target >= 0.8), ``start_bias_ms`` / ``end_bias_ms`` (median signed error of word starts /
   ends, aligned minus reference: negative is early), and
   ``audio_s_per_s`` (seconds of test audio aligned per second, median of ``--repeats``
   runs, features + phone model + Viterbi, ``--threads`` CPU threads);
5. the senone tree grown from the train alignments: ``senones`` and ``tree_depth``.

Usage::

    nice python benchmarks/alignment.py --corpus /tmp/synthcommands [--train-utterances 400]
    python benchmarks/alignment.py --corpus /tmp/synthcommands --device cuda  # on a GPU
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="SynthCommands folder (made if absent)")
    parser.add_argument("--split", choices=["test", "valid"], default="test",
                        help="split to evaluate (tune on valid, report on test)")
    parser.add_argument("--train-utterances", type=int, default=400)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--init", choices=["ctc", "flat"], default="ctc")
    parser.add_argument("--ctc-epochs", type=int, default=12)
    parser.add_argument("--prior-scale", type=float, default=0.7)
    parser.add_argument("--batch-parts", type=int, default=4,
                        help="parts of each gradient batch (what ranks can share)")
    parser.add_argument("--max-leaves", type=int, default=500)
    parser.add_argument("--min-count", type=int, default=50)
    parser.add_argument("--min-gain", type=float, default=100.0)
    parser.add_argument("--repeats", type=int, default=1, help="timed passes over the test set")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from speechbrain.dataio.dataio import read_audio

    from sb_crossmodal_kd.alignment.corpus import read_manifest, tree_statistics
    from sb_crossmodal_kd.alignment.forced import AlignerSettings, PhoneAligner, boundary_errors
    from sb_crossmodal_kd.data.corpus import make_corpus
    from sb_crossmodal_kd.units.lexicon import Lexicon, oov_report
    from sb_crossmodal_kd.units.senones import SenoneTree

    if not os.path.isfile(os.path.join(args.corpus, "test.csv")):
        # Every core: the corpus is the same, byte for byte, whatever jobs is.
        make_corpus(args.corpus, progress=False, jobs=os.cpu_count())
    train_rows = read_manifest(os.path.join(args.corpus, "train.csv"))
    test_rows = read_manifest(os.path.join(args.corpus, f"{args.split}.csv"))
    with open(os.path.join(args.corpus, f"{args.split}_alignments.json")) as f:
        reference = json.load(f)

    lexicon = Lexicon.from_cmudict(oov_policy="g2p")
    oov = oov_report(lexicon, [(r["ID"], r["wrd"]) for r in test_rows])
    oov_train = oov_report(lexicon, [(r["ID"], r["wrd"]) for r in train_rows])

    rows = train_rows[: args.train_utterances]
    settings = AlignerSettings(
        iterations=args.iterations, epochs=args.epochs, init=args.init,
        ctc_epochs=args.ctc_epochs, prior_scale=args.prior_scale, batch_parts=args.batch_parts,
    )
    aligner = PhoneAligner(lexicon, settings, args.device)
    start = time.time()
    report = aligner.train([(r["ID"], r["wav"], r["wrd"]) for r in rows], progress=False)
    train_seconds = time.time() - start

    audio = [read_audio(r["wav"]) for r in test_rows]
    audio_s = sum(len(a) for a in audio) / aligner.settings.frame_rate.sample_rate
    speeds, signed = [], []
    for repeat in range(args.repeats):
        start = time.time()
        results = []
        for row, wav in zip(test_rows, audio, strict=True):
            feats = aligner.features(wav)
            results.append(aligner.align_features(feats, row["wrd"], row["ID"]))
        speeds.append(audio_s / (time.time() - start))
        if repeat == 0:
            for row, result in zip(test_rows, results, strict=True):
                ref = [tuple(w) for w in reference[row["ID"]]["words"]]
                signed += boundary_errors(ref, result.words, signed=True)
    signed = np.asarray(signed)
    errors = np.abs(signed)

    # Tree from the train utterances' alignments (the phone model's own training data).
    alignments = {}
    for row in rows:
        a = aligner.align(row["wav"], row["wrd"], row["ID"])
        alignments[row["ID"]] = {"phones": a.phones, "feature_positions": a.feature_positions}
    stats = tree_statistics(alignments, rows, aligner.features,
                            aligner.settings.frame_rate.sample_rate, progress=False)
    tree = SenoneTree.build(stats, args.max_leaves, args.min_count, args.min_gain)

    print(json.dumps({
        "boundary_mae_ms": round(1000 * float(errors.mean()), 2),
        "boundary_median_ms": round(1000 * float(np.median(errors)), 2),
        "within_20ms": round(float((errors <= 0.020).mean()), 4),
        "start_bias_ms": round(1000 * float(np.median(signed[0::2])), 2),
        "end_bias_ms": round(1000 * float(np.median(signed[1::2])), 2),
        "boundaries": int(errors.size),
        "senones": tree.num_senones,
        "tree_depth": tree.depth,
        "oov_rate": round(oov["oov_rate"], 6),
        "oov_types": oov["oov_types"],
        "oov_rate_train": round(oov_train["oov_rate"], 6),
        "audio_s_per_s": round(statistics.median(speeds), 2),
        "split": args.split,
        "test_audio_s": round(audio_s, 1),
        "train_utterances": len(rows),
        "train_seconds": round(train_seconds, 1),
        # The phone model's training: audio seconds per second, and where its time goes.
        "train_audio_s_per_s": round(report["audio_seconds"] / train_seconds, 1),
        "train_phase_s": {k: round(v, 1) for k, v in report["phase_seconds"].items()},
        "batch_parts": args.batch_parts,
        "threads": args.threads,
        "device": args.device,
    }))


if __name__ == "__main__":
    sys.exit(main())
