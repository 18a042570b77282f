"""Cost of hierarchical distillation per training step; prints one JSON line.

One ``KDBrain.fit_batch`` (features, Conformer encoder, CTC, optimiser step) on the same
batch, for two conditions:

- ``am_alone``: the CTC acoustic model, no heads;
- ``hierarchy``: the same model with three auxiliary heads (senone at layer 1, monophone at
  layer 2, subword at layer 3), each distilled from a top-k teacher triple read from a real
  :class:`~sb_crossmodal_kd.teachers.cache.TeacherCache` into the batch, as the data loader
  gives it.

Figures: ``time_ratio`` (median step time of ``hierarchy`` / ``am_alone``, targets <= 1.15),
``memory_ratio`` (training memory of the step, same ratio, target <= 1.2; CUDA: allocator
peak; CPU, where no allocator peak exists: parameters + gradients + AdamW state + every tensor
saved for backward, deduplicated by storage, which is deterministic), and the raw figures. Each condition runs in its own subprocess (so peaks do not mix), for
``--rounds`` rounds in alternating order; the ratio is of the medians over all rounds.
Sizes are those of the SynthCommands recipe (d_model 144, 4 layers, 128 subwords).

With ``--epoch-folder`` (an ``sbkd demo`` output folder: its ``data/`` and ``prep/``) it also
times one training epoch of the demo's AM alone (``epoch_s``, the second epoch, median over
rounds) under the recipe's settings before the profiling work (filterbanks from the waveform
in every batch, dropout 0.1, 20-second batches, no SpecAugment) and after it (the demo's
settings now: cached filterbanks, SpecAugment), side by side in the same run. Usage::

    nice python benchmarks/kd_step.py [--device cpu|cuda] [--threads 1] [--rounds 3]
                                      [--epoch-folder DEMO_OUTPUT]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

D_MODEL, LAYERS, NHEAD, D_FFN, KERNEL = 144, 4, 4, 576, 15
VOCAB, N_SENONES, N_MONOPHONES, TOP_K = 128, 500, 40, 10
BATCH, SECONDS = 8, 3.0
CONDITIONS = ("am_alone", "hierarchy")


def _batch(folder):
    """A fixed batch with units, alignments and cached teacher triples per unit type."""
    from speechbrain.dataio.batch import PaddedBatch

    from sb_crossmodal_kd.alignment.framerate import FrameRate
    from sb_crossmodal_kd.teachers.base import Teacher
    from sb_crossmodal_kd.teachers.cache import TeacherCache, build_cache

    class RandomLM(Teacher):
        def unit_logits(self, unit_ids, lengths):
            gen = torch.Generator().manual_seed(int(unit_ids.sum()))
            return 3 * torch.randn(*unit_ids.shape, self.vocab_size, generator=gen)

    gen = torch.Generator().manual_seed(0)
    rate = FrameRate()
    sizes = {"senone": N_SENONES, "monophone": N_MONOPHONES, "subword": VOCAB}
    items = []
    for i in range(BATCH):
        samples = int(16000 * SECONDS * (1 - 0.05 * i))
        frames = rate.frames_for_samples(samples)
        item = {"id": f"u{i}", "sig": 0.1 * torch.randn(samples, generator=gen), "wrd": "x",
                "tokens": torch.randint(0, VOCAB, (12,), generator=gen)}
        for unit_type, size in sizes.items():
            n_units = {"senone": frames // 2, "monophone": frames // 4, "subword": 12}[unit_type]
            item[f"{unit_type}_units"] = torch.randint(0, size, (n_units,), generator=gen)
            f2p = torch.arange(frames) * n_units // frames
            f2p[:2] = -1  # leading silence
            item[f"{unit_type}_frame_to_position"] = f2p
        items.append(item)
    for unit_type, size in sizes.items():
        teacher = RandomLM(vocab_size=size, name="random", unit_type=unit_type)
        sequences = [(it["id"], it[f"{unit_type}_units"].tolist()) for it in items]
        build_cache(teacher, sequences, Path(folder) / unit_type, k=TOP_K, progress=False)
        cache = TeacherCache(Path(folder) / unit_type, vocab_size=size)
        for it in items:
            probs, ids, rest = cache.utterance(it["id"])
            it.update({f"{unit_type}_top_probs": probs, f"{unit_type}_top_ids": ids,
                       f"{unit_type}_residual": rest})
    return PaddedBatch(items)


def _brain(condition, device):
    import speechbrain as sb
    from speechbrain.lobes.features import Fbank
    from speechbrain.nnet.activations import Softmax
    from speechbrain.processing.features import InputNormalization

    from sb_crossmodal_kd.kd_brain import KDBrain
    from sb_crossmodal_kd.nnet.conformer import ConformerCTCEncoder
    from sb_crossmodal_kd.nnet.heads import AuxiliaryHead, AuxiliaryHeads

    torch.manual_seed(0)
    modules = {
        "compute_features": Fbank(n_mels=80),
        "normalize": InputNormalization(),
        "encoder": ConformerCTCEncoder(n_mels=80, d_model=D_MODEL, num_layers=LAYERS,
                                       nhead=NHEAD, d_ffn=D_FFN, kernel_size=KERNEL),
        "ctc_lin": torch.nn.Linear(D_MODEL, VOCAB + 1),
    }
    if condition == "hierarchy":
        modules["auxiliary_heads"] = AuxiliaryHeads(
            senone=AuxiliaryHead("senone", 1, D_MODEL, N_SENONES),
            monophone=AuxiliaryHead("monophone", 2, D_MODEL, N_MONOPHONES),
            subword=AuxiliaryHead("subword", 3, D_MODEL, VOCAB),
        )
    hparams = {"blank_index": VOCAB, "log_softmax": Softmax(apply_log=True),
               "lr_annealing": lambda optimizer: None}
    brain = KDBrain(modules=modules, opt_class=lambda p: torch.optim.AdamW(p, lr=1e-4),
                    hparams=hparams, run_opts={"device": device})
    brain.init_optimizers()
    brain.on_stage_start(sb.Stage.TRAIN, epoch=1)
    return brain


def _training_bytes(brain, batch):
    """Parameters, gradients, AdamW state and the tensors saved for backward in one step."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        brain.fit_batch(batch)
    params = sum(p.numel() * p.element_size() for p in brain.modules.parameters())
    return 4 * params + sum(storages.values())


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _worker(condition, device, repeats, warmup, folder):
    """Times ``repeats`` steps after ``warmup``; returns (median s, peak bytes)."""
    batch = _batch(folder)
    brain = _brain(condition, device)
    for _ in range(warmup):
        brain.fit_batch(batch)
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        brain.fit_batch(batch)
        _sync(device)
        times.append(time.perf_counter() - start)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()  # includes parameters and optimiser state
    else:
        peak = _training_bytes(brain, batch)
    return statistics.median(times), max(peak, 0)


# The demo's AM alone before and after the profiling work (recipe overrides).
EPOCH_SETTINGS = {
    "before": {"number_of_epochs": 2, "d_model": 64, "num_layers": 3, "d_ffn": 256,
               "dropout": 0.1, "max_batch_seconds": 20, "cache_features": False,
               "use_spec_augment": False},
    "after": None,  # DEMO_TRAINING with two epochs
}


def _epoch_worker(setting, folder, output):
    """Seconds of the second training epoch of the AM alone (the first fills caches)."""
    from sb_crossmodal_kd.ablation import DEMO_TRAINING, condition_recipe
    from sb_crossmodal_kd.experiment import (
        asr_datasets,
        fill_schedule_length,
        load_hparams,
        train_loader_options,
    )

    overrides = EPOCH_SETTINGS[setting] or {**DEMO_TRAINING, "number_of_epochs": 2}
    path, condition = condition_recipe("am_alone")
    hparams = load_hparams(path, {"data_folder": f"{folder}/data",
                                  "prep_folder": f"{folder}/prep", **overrides, **condition,
                                  "output_folder": output})
    datasets = asr_datasets(hparams)
    brain = hparams["brain_class"](modules=hparams["modules"], opt_class=hparams["opt_class"],
                                   hparams=hparams, run_opts={"device": "cpu"})
    loader_options = train_loader_options(hparams, datasets["train"])
    fill_schedule_length(hparams["lr_annealing"], loader_options, datasets["train"],
                         hparams["number_of_epochs"])
    brain.fit(hparams["epoch_counter"], datasets["train"], None,
              train_loader_kwargs=loader_options)
    return brain.train_stats["epoch_s"]


def _epoch_times(args):
    """Median ``epoch_s`` per setting, the settings alternating over ``args.rounds``."""
    times = {setting: [] for setting in EPOCH_SETTINGS}
    with tempfile.TemporaryDirectory() as output:
        for round_index in range(args.rounds):
            order = list(EPOCH_SETTINGS) if round_index % 2 == 0 else list(EPOCH_SETTINGS)[::-1]
            for setting in order:
                command = [sys.executable, __file__, "--epoch-worker", setting,
                           "--epoch-folder", args.epoch_folder, "--threads", str(args.threads),
                           "--folder", os.path.join(output, f"{setting}{round_index}")]
                out = subprocess.run(command, check=True, capture_output=True, text=True)
                times[setting].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {setting: round(statistics.median(v), 2) for setting, v in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", choices=CONDITIONS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--epoch-folder", help="an `sbkd demo` output folder: also time an "
                        "epoch of its AM alone before and after the profiling work")
    parser.add_argument("--epoch-worker", choices=list(EPOCH_SETTINGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.epoch_worker:
        print(json.dumps(_epoch_worker(args.epoch_worker, args.epoch_folder, args.folder)))
        return
    if args.worker:
        seconds, peak = _worker(args.worker, args.device, args.repeats, args.warmup,
                                args.folder)
        print(json.dumps({"seconds": seconds, "peak_bytes": peak}))
        return
    times = {c: [] for c in CONDITIONS}
    peaks = {c: [] for c in CONDITIONS}
    with tempfile.TemporaryDirectory() as folder:
        for round_index in range(args.rounds):
            order = CONDITIONS if round_index % 2 == 0 else CONDITIONS[::-1]
            for condition in order:
                command = [sys.executable, __file__, "--worker", condition, "--folder",
                           os.path.join(folder, f"{condition}{round_index}"),
                           "--device", args.device, "--threads", str(args.threads),
                           "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
                out = subprocess.run(command, check=True, capture_output=True, text=True)
                result = json.loads(out.stdout.strip().splitlines()[-1])
                times[condition].append(result["seconds"])
                peaks[condition].append(result["peak_bytes"])
    time_med = {c: statistics.median(v) for c, v in times.items()}
    peak_med = {c: statistics.median(v) for c, v in peaks.items()}
    epochs = {}
    if args.epoch_folder:
        epoch_s = _epoch_times(args)
        epochs = {"epoch_s": epoch_s, "epoch_ratio": round(epoch_s["after"] / epoch_s["before"], 3),
                  "epoch_settings": {k: v or "DEMO_TRAINING" for k, v in EPOCH_SETTINGS.items()}}
    print(json.dumps({
        "benchmark": "kd_step",
        "device": args.device,
        "threads": args.threads,
        "batch": f"{BATCH} x {SECONDS} s, d_model {D_MODEL}, {LAYERS} layers",
        "heads": {"senone": [1, N_SENONES], "monophone": [2, N_MONOPHONES],
                  "subword": [3, VOCAB]},
        "teacher_top_k": TOP_K,
        "time_ratio": round(time_med["hierarchy"] / time_med["am_alone"], 3),
        "memory_ratio": round(peak_med["hierarchy"] / max(peak_med["am_alone"], 1), 3),
        "step_s": {c: round(v, 4) for c, v in time_med.items()},
        "peak_mib": {c: round(v / 2**20, 1) for c, v in peak_med.items()},
        "rounds": args.rounds,
        "repeats": args.repeats,
        **epochs,
    }))


if __name__ == "__main__":
    main()
