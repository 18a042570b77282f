"""DDP on CPU (gloo, 2 processes under torchrun or started here): MoE state and statistics are
reduced across ranks, local ranks get their own arguments and report the first error, and the baseline recipe trained by 2 processes with batch B matches 1 process with
batch 2B (same vocabulary, parameter shapes, loss curve and weights within a tolerance)."""

import csv
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from launch import torchrun_command

from sb_crossmodal_kd.analysis.expert_usage import ExpertUsageTracker, expert_usage_report
from sb_crossmodal_kd.data.corpus import make_corpus
from sb_crossmodal_kd.distributed import gather_objects, rank, run_on_local_ranks
from sb_crossmodal_kd.nnet.dmoe import DeepMoE

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "SynthCommands" / "ASR"
TINY_MODEL = [
    "--d_model=32", "--num_layers=1", "--nhead=2", "--d_ffn=64", "--n_mels=40",
    "--vocab_size=40", "--warmup_steps=5", "--lr=0.003",
]
MARGINS = {"loose": 1e9, "tight": 0.5}  # never binding / binding from the first batch
STEPS, FRAMES, FEATURES = 3, 7, 6


def torchrun(args, cwd, nproc=2):
    """Runs ``args`` (a script and its arguments) in ``nproc`` gloo processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(torchrun_command(args, nproc), cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def moe_inputs():
    """Per step and rank: a padded batch [2, FRAMES, FEATURES] and its relative lengths."""
    generator = torch.Generator().manual_seed(5)
    data = torch.randn(STEPS, 2, 2, FRAMES, FEATURES, generator=generator)
    lengths = torch.tensor([[1.0, 4 / 7], [5 / 7, 1.0]])
    return data, lengths


def moe_model(margin):
    torch.manual_seed(0)
    return DeepMoE(FEATURES, num_layers=2, layer_size=5, num_experts=3,
                   balance_margin=margin).train()


def run_moe(model, batches):
    """Trains-mode forward passes; returns the constraints' totals and the usage report."""
    tracker = ExpertUsageTracker()
    for x, lengths in batches:
        model(x, lengths=lengths)
        tracker.update(model)
    totals = [layer.constraint.totals.tolist() for layer in model.layers]
    return {"totals": totals, "report": expert_usage_report(model, tracker)}


MOE_WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as dist
    sys.path.insert(0, sys.argv[2])
    from test_distributed import MARGINS, moe_inputs, moe_model, run_moe

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    data, lengths = moe_inputs()
    results = {}
    for name, margin in MARGINS.items():
        batches = [(data[step, rank], lengths[rank]) for step in range(len(data))]
        results[name] = run_moe(moe_model(margin), batches)
    with open(f"{sys.argv[1]}/rank{rank}.json", "w") as handle:
        json.dump(results, handle)
    dist.destroy_process_group()
    """
)


EXITING_WORKER = textwrap.dedent(
    """
    import atexit, os, sys
    import torch
    from sb_crossmodal_kd.distributed import init_distributed, sum_across_processes

    def record():  # registered first, so run last among the exit handlers
        with open(f"{sys.argv[1]}/rank{os.environ['RANK']}.txt", "w") as handle:
            handle.write(str(torch.distributed.is_initialized()))

    atexit.register(record)
    init_distributed({})
    sum_across_processes([torch.ones(3)])
    """
)


def test_a_recipe_process_destroys_its_group_before_the_interpreter_exits(tmp_path):
    # A gloo group left to interpreter shutdown can abort a finished rank (SIGABRT), and
    # torchrun then reports the whole run as failed.
    worker = tmp_path / "exiting_worker.py"
    worker.write_text(EXITING_WORKER)
    run = torchrun([str(worker), str(tmp_path)], cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["False", "False"]


FINISHING_WORKER = textwrap.dedent(
    """
    import atexit, os, sys
    import torch
    from sb_crossmodal_kd.distributed import finish_process, init_distributed

    out = f"{sys.argv[1]}/rank{os.environ['RANK']}"

    def record():  # registered first, so run last among the exit handlers
        with open(f"{out}.exit", "w") as handle:
            handle.write(str(torch.distributed.is_initialized()))

    class Finalized:  # a module global: deleted only in the interpreter's finalization
        def __del__(self):
            open(f"{out}.finalized", "w").close()

    atexit.register(record)
    init_distributed({})
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 1))
    model(torch.randn(4, 2)).sum().backward()  # DDP keeps gloo's threads alive to the end
    marker = Finalized()
    finish_process()
    raise AssertionError("finish_process returned")
    """
)


def test_a_finished_recipe_process_exits_without_the_interpreters_teardown(tmp_path):
    # Once DDP has been used, gloo's threads outlive destroy_process_group, and their
    # teardown in finalization now and then aborts a finished rank: the recipes end with
    # finish_process, which runs the exit handlers (the group is destroyed) and exits 0.
    worker = tmp_path / "finishing_worker.py"
    worker.write_text(FINISHING_WORKER)
    run = torchrun([str(worker), str(tmp_path)], cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [(tmp_path / f"rank{r}.exit").read_text() for r in range(2)] == ["False", "False"]
    assert not list(tmp_path.glob("*.finalized"))


def _add_rank_and_gather(counts):
    # a rank's own copy of counts: adding to it changes neither the caller's nor a peer's
    counts += rank() + 1
    return gather_objects(counts.tolist())


def _fail_on_rank_1(counts):
    if rank() == 1:
        raise ValueError("rank 1: this utterance cannot be used")
    return gather_objects(counts.tolist())  # rank 0 loses its peer here


def test_local_ranks_each_get_their_own_arguments_and_return_rank_0s_result():
    counts = torch.zeros(2)
    assert run_on_local_ranks(_add_rank_and_gather, (counts,), processes=2) == [[1, 1], [2, 2]]
    assert counts.tolist() == [0, 0]


def test_local_ranks_raise_the_first_error_not_the_lost_peers():
    with pytest.raises(ValueError, match="rank 1: this utterance cannot be used"):
        run_on_local_ranks(_fail_on_rank_1, (torch.zeros(1),), processes=2)


def test_moe_constraint_and_statistics_are_reduced_across_two_processes(tmp_path):
    worker = tmp_path / "moe_worker.py"
    worker.write_text(MOE_WORKER)
    run = torchrun([str(worker), str(tmp_path), str(Path(__file__).parent)], cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    # Every rank holds the same constraint state and reports the same statistics.
    for name in MARGINS:
        assert ranks[0][name] == ranks[1][name], name

    # Those of all the data: one process given both ranks' frames as one batch per step
    # (with a margin that never binds, where deciding per rank changes nothing).
    data, lengths = moe_inputs()
    batches = [(torch.cat([data[s, 0], data[s, 1]]), lengths.reshape(-1)) for s in range(STEPS)]
    single = run_moe(moe_model(MARGINS["loose"]), batches)
    both = ranks[0]["loose"]
    assert torch.allclose(torch.tensor(both["totals"]), torch.tensor(single["totals"]),
                          atol=1e-4)
    report, expected = both["report"], single["report"]
    assert report["frames"] == expected["frames"] == STEPS * (7 + 4 + 5 + 7)
    assert report["joint_usage"] == expected["joint_usage"]
    assert report["combinations_used"] == expected["combinations_used"]
    for layer, stats in expected["layers"].items():
        assert report["layers"][layer]["frames"] == stats["frames"]
        assert report["layers"][layer]["usage"] == pytest.approx(stats["usage"], abs=1e-6)
        assert report["layers"][layer]["gate_entropy"] == pytest.approx(stats["gate_entropy"])

    # The binding constraint really acted on the shared totals: its spread stays within
    # margin + one batch of every rank (2 ranks x 2 x 7 frames of gate mass).
    tight = torch.tensor(ranks[0]["tight"]["totals"])
    assert float((tight.max(-1).values - tight.min(-1).values).max()) <= 0.5 + 2 * 2 * FRAMES


@pytest.fixture(scope="module")
def equal_length_corpus(tmp_path_factory):
    """A tiny corpus whose utterances are padded with silence to one length.

    SpeechBrain's relative lengths are rounded at each frame rate against the batch's
    longest utterance, so batches padded differently count a frame more or less here and
    there. Without padding, 2 processes x B and 1 process x 2B run the same computation.
    """
    synth = tmp_path_factory.mktemp("synth")
    make_corpus(synth, progress=False, n_train=24, n_valid=6, n_test=6, n_text=100,
                n_text_valid=10, speakers=(3, 1, 1), seed=3)
    folder = tmp_path_factory.mktemp("equal_length")
    rows = {}
    for split in ("train", "valid", "test"):
        with open(synth / f"{split}.csv", newline="") as handle:
            rows[split] = list(csv.DictReader(handle))
    waves = {row["ID"]: soundfile.read(row["wav"], dtype="float32") for r in rows.values()
             for row in r}
    longest = max(len(audio) for audio, _ in waves.values())
    for split, split_rows in rows.items():
        for row in split_rows:
            audio, rate = waves[row["ID"]]
            row["wav"] = str(folder / f"{row['ID']}.wav")
            soundfile.write(row["wav"], np.pad(audio, (0, longest - len(audio))), rate,
                            subtype="PCM_16")
            row["duration"] = f"{longest / rate:.4f}"
        with open(folder / f"{split}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(split_rows[0]))
            writer.writeheader()
            writer.writerows(split_rows)
    return folder


def log_losses(folder):
    """(train loss, valid loss) per epoch from a recipe's train_log.txt."""
    rows = []
    for line in (folder / "train_log.txt").read_text().splitlines():
        if "train loss" in line:
            train = re.search(r"train loss: ([0-9.e+-]+)", line).group(1)
            valid = re.search(r"valid loss: ([0-9.e+-]+)", line).group(1)
            rows.append((float(train), float(valid)))
    return rows


def last_checkpoint(save_folder):
    """The newest end-of-epoch checkpoint folder."""
    best = None
    for meta in save_folder.glob("CKPT+*/CKPT.yaml"):
        text = meta.read_text()
        if "end-of-epoch: true" not in text:
            continue
        unixtime = float(re.search(r"unixtime: ([0-9.e+]+)", text).group(1))
        if best is None or unixtime > best[0]:
            best = (unixtime, meta.parent)
    return best[1]


def test_recipe_two_processes_match_one_with_twice_the_batch(equal_length_corpus, tmp_path):
    common = [
        str(RECIPE / "hparams" / "conformer_ctc.yaml"), f"--data_folder={equal_length_corpus}",
        "--number_of_epochs=2", "--dynamic_batching=False", "--dropout=0.0", *TINY_MODEL,
    ]
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    run = torchrun([str(RECIPE / "train.py"), *common, f"--output_folder={ddp}",
                    "--batch_size=2"], cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]  # torchrun: every rank exited cleanly
    subprocess.run([sys.executable, str(RECIPE / "train.py"), *common,
                    f"--output_folder={single}", "--batch_size=4"],
                   check=True, cwd=tmp_path, capture_output=True, text=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})

    vocab = [(out / "save" / "tokenizer" / "40_unigram.vocab").read_text() for out in (ddp, single)]
    assert vocab[0] == vocab[1]

    # The same optimiser steps on the same global batches: the logged losses (2 decimals;
    # under DDP the mean over ranks) agree to their last digit, the test loss to float noise.
    ddp_losses, single_losses = log_losses(ddp), log_losses(single)
    assert len(ddp_losses) == len(single_losses) == 2
    for got, expected in zip(ddp_losses, single_losses, strict=True):
        assert got == pytest.approx(expected, abs=0.0101), (ddp_losses, single_losses)
    results = [json.loads((out / "results.json").read_text()) for out in (ddp, single)]
    assert results[0]["params"] == results[1]["params"]
    assert results[0]["test_loss"] == pytest.approx(results[1]["test_loss"], rel=1e-4)

    # Weights: same shapes, and equal but for float reordering (per-rank GEMMs, the gradient
    # all-reduce). Adam moves a weight by up to about lr (3e-3 here) per step whatever its
    # gradient's size, so where a gradient is near zero that noise can flip a few steps:
    # measured median difference 1.4e-6, largest 2.8e-3. A real mismatch (other batches,
    # unsynchronised gradients, dropout masks drawn per batch) moved weights by over 3e-2.
    checkpoints = [last_checkpoint(out / "save") for out in (ddp, single)]
    differences = []
    for name in ("encoder", "ctc_lin", "normalize"):
        got, expected = (torch.load(c / f"{name}.ckpt", weights_only=False) for c in checkpoints)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            if torch.is_tensor(value) and value.is_floating_point():
                assert got[key].shape == value.shape, key
                differences.append((got[key] - value).abs().flatten())
    differences = torch.cat(differences)
    assert float(differences.median()) < 1e-5
    assert float(differences.max()) < 5e-3
