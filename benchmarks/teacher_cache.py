#!/usr/bin/env python3
"""Teacher cache figures on the embedded corpus's subword teacher; prints one JSON line.

    python benchmarks/teacher_cache.py --data_folder DATA --teacher LM_DIR --tokenizer SPM

DATA is a SynthCommands corpus, LM_DIR the subword unit LM exported by
``recipes/SynthCommands/LM/train.py hparams/subword.yaml`` and SPM its tokenizer
(``<output>/save/tokenizer/128_unigram.model``). The utterances are ``DATA/train.csv``'s
transcripts converted to subwords. Figures:

* ``build_positions_per_s``: cache build throughput on CPU (teacher forward + top-k + writing),
  median over ``--repeats`` builds into fresh folders;
* ``bytes_per_1k_positions``: bytes on disk (shards, indexes, header) per 1000 positions for
  ``k`` in 8, 32 and the full vocabulary;
* ``topk32_rel_diff``: ``|KL_top32 - KL_full| / KL_full`` summed over all positions, where
  ``KL_top32`` uses the top-32 cache as read back (float16, residual spread in proportion to
  the student) and ``KL_full`` the teacher's full distribution, both through the training
  loss :func:`sb_crossmodal_kd.losses.topk_kl_divergence`. Two stand-in students, since no trained acoustic model is
  involved: the subword unigram of the speech transcripts (context-blind) and an add-one
  bigram of them (partly agreeing with the teacher); the larger difference is reported
  (``topk32_rel_diff_tau2``, ``topk64_rel_diff_tau2``: the same with the teacher softened
  to ``tau = 2``);
* ``read_vs_consume``: positions per second the cache serves (``TeacherCache.distributions``
  for random batches of ``--batch_size`` utterance IDs, median over batches) divided by the
  positions per second a training step of the baseline acoustic model consumes
  (``recipes/SynthCommands/ASR`` Conformer CTC: Fbank, 4 layers of width 144, CTC loss,
  forward + backward + AdamW step on a real batch of the same size, median over steps).
"""

import argparse
import csv
import json
import os
import random
import statistics
import sys
import tempfile
import time

import speechbrain as sb
import torch

from sb_crossmodal_kd.losses import topk_kl_divergence
from sb_crossmodal_kd.teachers import load_teacher
from sb_crossmodal_kd.teachers.cache import TeacherCache, build_cache, utterances_from_manifest
from sb_crossmodal_kd.teachers.unit_lm import batches
from sb_crossmodal_kd.units.types import TextUnits


def log(message):
    print(message, file=sys.stderr, flush=True)


def folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))


def student_log_probs(utterances, vocab_size):
    """Unigram and add-one bigram log-probability functions from the transcripts' units."""
    unigram = torch.ones(vocab_size)
    bigram = torch.ones(vocab_size + 1, vocab_size)  # row vocab_size: sentence start
    for _, units in utterances:
        previous = vocab_size
        for unit in units:
            unigram[unit] += 1
            bigram[previous, unit] += 1
            previous = unit
    unigram_lp = (unigram / unigram.sum()).log()
    bigram_lp = (bigram / bigram.sum(-1, keepdim=True)).log()

    def unigram_student(unit_ids):
        return unigram_lp.expand(*unit_ids.shape, vocab_size)

    def bigram_student(unit_ids):
        previous = torch.cat([torch.full_like(unit_ids[:, :1], vocab_size), unit_ids[:, :-1]], 1)
        return bigram_lp[previous]

    return {"unigram": unigram_student, "bigram": bigram_student}


def topk_rel_diff(teacher, cache, utterances, students, tau=1.0):
    """Relative difference of summed KL (top-k cache vs full) per student."""
    sequences = [units for _, units in utterances]
    ids = [utt_id for utt_id, _ in utterances]
    totals = {name: [0.0, 0.0] for name in students}
    for start, (unit_ids, lengths) in zip(
        range(0, len(sequences), 64), batches(sequences, 64), strict=True
    ):
        mask = torch.arange(unit_ids.shape[1])[None, :] < lengths[:, None]
        full = teacher.distributions(unit_ids, lengths, k=teacher.vocab_size, tau=tau)
        cached = cache.distributions(ids[start : start + 64], max_len=unit_ids.shape[1])
        for name, student in students.items():
            student_lp = student(unit_ids)
            # The training loss itself (sb_crossmodal_kd.losses), fed both triples.
            totals[name][0] += float((topk_kl_divergence(student_lp, *full) * mask).sum())
            totals[name][1] += float((topk_kl_divergence(student_lp, *cached) * mask).sum())
    return {
        name: {"kl_full": full / mask_count(sequences), "kl_top": top / mask_count(sequences),
               "rel_diff": abs(top - full) / full}
        for name, (full, top) in totals.items()
    }


def mask_count(sequences):
    return sum(len(s) for s in sequences)


def training_step_positions_per_s(rows, utterances, batch_size, steps):
    """Positions/s consumed by a training step of the baseline Conformer CTC model."""
    from sb_crossmodal_kd.nnet.conformer import ConformerCTCEncoder

    torch.manual_seed(0)
    fbank = sb.lobes.features.Fbank(n_mels=80)
    encoder = ConformerCTCEncoder(n_mels=80, d_model=144, num_layers=4, nhead=4, d_ffn=576,
                                  kernel_size=15)
    ctc_lin = torch.nn.Linear(144, 129)
    params = list(encoder.parameters()) + list(ctc_lin.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    units = dict(utterances)
    rng = random.Random(0)
    times, positions = [], []
    for step in range(steps + 1):
        chosen = rng.sample([r for r in rows if r["ID"] in units], batch_size)
        waves = [sb.dataio.dataio.read_audio(r["wav"]) for r in chosen]
        wav_lens = torch.tensor([len(w) for w in waves], dtype=torch.float)
        padded = torch.zeros(batch_size, int(wav_lens.max()))
        for i, w in enumerate(waves):
            padded[i, : len(w)] = w
        targets = [torch.tensor(units[r["ID"]]) for r in chosen]
        target_lens = torch.tensor([len(t) for t in targets])
        target_pad = torch.nn.utils.rnn.pad_sequence(targets, batch_first=True)
        rel = wav_lens / wav_lens.max()
        start = time.perf_counter()
        feats = fbank(padded)
        out = ctc_lin(encoder(feats, rel)).log_softmax(-1)
        out_lens = torch.round(rel * out.shape[1]).long()
        loss = torch.nn.functional.ctc_loss(out.transpose(0, 1), target_pad, out_lens,
                                            target_lens, blank=128, zero_infinity=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        elapsed = time.perf_counter() - start
        if step > 0:  # the first step warms up allocators
            times.append(elapsed)
            positions.append(int(target_lens.sum()))
    return statistics.median(p / t for p, t in zip(positions, times, strict=True))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_folder", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--train_steps", type=int, default=5)
    args = parser.parse_args(argv)

    teacher = load_teacher(args.teacher).to("cpu")
    text_units = TextUnits.from_files("subword", tokenizer=args.tokenizer)
    manifest = os.path.join(args.data_folder, "train.csv")
    utterances, skipped = utterances_from_manifest(manifest, text_units)
    n_positions = sum(len(u) for _, u in utterances)
    log(f"{len(utterances)} utterances, {n_positions} subword positions, V={teacher.vocab_size}")
    result = {"utterances": len(utterances), "positions": n_positions,
              "vocab_size": teacher.vocab_size, "torch_threads": torch.get_num_threads()}

    with tempfile.TemporaryDirectory() as scratch:
        build_rates = []
        for repeat in range(args.repeats):
            folder = os.path.join(scratch, f"k32_{repeat}")
            start = time.perf_counter()
            build_cache(teacher, utterances, folder, k=32, tokenizer_hash=text_units.hash,
                        device="cpu", progress=False)
            build_rates.append(n_positions / (time.perf_counter() - start))
        result["build_positions_per_s"] = round(statistics.median(build_rates), 1)
        log(f"build: {build_rates}")

        sizes = {}
        for name, k in (("8", 8), ("32", 32), ("full", teacher.vocab_size)):
            folder = os.path.join(scratch, f"size_{name}")
            build_cache(teacher, utterances, folder, k=k, tokenizer_hash=text_units.hash,
                        device="cpu", progress=False)
            sizes[name] = round(1000 * folder_bytes(folder) / n_positions, 1)
        result["bytes_per_1k_positions"] = sizes

        cache = TeacherCache(os.path.join(scratch, "k32_0"), vocab_size=teacher.vocab_size,
                             tokenizer_hash=text_units.hash)
        students = student_log_probs(utterances, teacher.vocab_size)
        diffs = topk_rel_diff(teacher, cache, utterances, students)
        result["topk32_rel_diff"] = round(max(d["rel_diff"] for d in diffs.values()), 5)
        result["topk32_by_student"] = {
            name: {key: round(value, 5) for key, value in d.items()} for name, d in diffs.items()
        }
        log(f"topk32: {diffs}")
        # A softened teacher (tau = 2, common in distillation) spreads more mass past the top 32.
        for k in (32, 64):
            soft = os.path.join(scratch, f"k{k}_tau2")
            build_cache(teacher, utterances, soft, k=k, tau=2.0, tokenizer_hash=text_units.hash,
                        device="cpu", progress=False)
            soft_diffs = topk_rel_diff(teacher, TeacherCache(soft, temperature=2.0), utterances,
                                       students, tau=2.0)
            result[f"topk{k}_rel_diff_tau2"] = round(
                max(d["rel_diff"] for d in soft_diffs.values()), 5
            )
            log(f"topk{k} tau=2: {soft_diffs}")

        rng = random.Random(1)
        ids = [utt_id for utt_id, _ in utterances]
        read_rates = []
        for _ in range(200):
            chosen = rng.sample(ids, args.batch_size)
            start = time.perf_counter()
            dist = cache.distributions(chosen)
            elapsed = time.perf_counter() - start
            read_rates.append(int((dist.top_probs.sum(-1) > 0).sum()) / elapsed)
        read = statistics.median(read_rates)

    with open(manifest, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    consume = training_step_positions_per_s(rows, utterances, args.batch_size, args.train_steps)
    result["cache_read_positions_per_s"] = round(read, 1)
    result["train_step_positions_per_s"] = round(consume, 1)
    result["read_vs_consume"] = round(read / consume, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
