"""Exact resume: a recipe killed (SIGKILL) after a mid-epoch checkpoint and re-run ends
exactly where an uninterrupted run of the same seed ends: weights, optimiser, scheduler,
MoE constraint state, random states, train log and test results.

Two recipes: the baseline Conformer CTC (dropout, dynamic batches in random order, Noam
schedule) and the Deep MoE frame classifier (balancing constraint active in the killed
epoch, expert-usage statistics), the latter also as 2 DDP processes under torchrun."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import speechbrain as sb
import torch
from launch import torchrun_command

from sb_crossmodal_kd.data.corpus import make_corpus
from sb_crossmodal_kd.resume import ExactResume

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "SynthCommands"
EPOCHS = 2
CASES = {
    "asr": (
        RECIPES / "ASR",
        "conformer_ctc.yaml",
        ["--d_model=32", "--num_layers=1", "--nhead=2", "--d_ffn=64", "--n_mels=40",
         "--vocab_size=40", "--max_batch_seconds=6", "--warmup_steps=5", "--lr=0.003"],
        ["encoder", "ctc_lin", "normalize", "scheduler", "optimizer"],
    ),
    "frame_dmoe": (
        RECIPES / "frame_classification",
        "dmoe.yaml",
        # labels from the corpus's synthesiser timings (no aligner to train here)
        ["--batch_size=2", "--alignments_folder=null", "--alignments_suffix=_alignments.json"],
        ["model", "normalizer", "optimizer"],
    ),
}
# Saved by every recipe: the epoch, the Brain's step and running loss, the loader's
# position, and the random states (written last but one; the optimiser is last).
COMMON_FILES = ["counter", "brain", "dataloader-TRAIN", "training_state"]


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth")
    make_corpus(folder, progress=False, n_train=16, n_valid=4, n_test=4, n_text=60,
                n_text_valid=6, speakers=(3, 1, 1), seed=3)
    return folder


# Runs a recipe (argv[1], its arguments after) in this interpreter, SIGKILLing its main
# process right after the first mid-epoch checkpoint of epoch 2 is written: a kill at that
# moment exactly, which a test polling the save folder from outside could not time (on the
# tiny corpus the run can reach its end-of-epoch save before the poll sees the checkpoint).
KILL_AFTER_MID_EPOCH_SAVE = f"""
import os, runpy, signal, sys
import speechbrain.core
from speechbrain.utils.distributed import if_main_process

save = speechbrain.core.Brain._save_intra_epoch_ckpt

def save_then_die(self):
    save(self)
    if self.checkpointer.recoverables["counter"].current == {EPOCHS} and if_main_process():
        os.kill(os.getpid(), signal.SIGKILL)

speechbrain.core.Brain._save_intra_epoch_ckpt = save_then_die
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def command(case, corpus, output, processes=1, killed_mid_epoch=None):
    """The command running ``case``'s recipe; with ``killed_mid_epoch`` (a file to write the
    wrapper to), killed right after its first mid-epoch checkpoint of the last epoch."""
    recipe, hparams, options, _ = CASES[case]
    args = [str(recipe / "train.py"), str(recipe / "hparams" / hparams),
            f"--data_folder={corpus}", f"--output_folder={output}",
            f"--number_of_epochs={EPOCHS}", "--ckpt_interval_steps=3", *options]
    if killed_mid_epoch is not None:
        killed_mid_epoch.write_text(KILL_AFTER_MID_EPOCH_SAVE)
        args = [str(killed_mid_epoch), *args]
    if processes > 1:  # SpeechBrain's DDP through torchrun, gloo on CPU
        return torchrun_command(args, processes)
    return [sys.executable, *args]


def checkpoints(save_folder):
    """(unixtime, folder, meta text) of every complete-looking checkpoint, oldest first."""
    found = []
    for meta in save_folder.glob("CKPT+*/CKPT.yaml"):
        try:
            text = meta.read_text()
        except FileNotFoundError:  # deleted meanwhile
            continue
        match = re.search(r"unixtime: ([0-9.e+]+)", text)
        if match:
            found.append((float(match.group(1)), meta.parent, text))
    return sorted(found, key=lambda c: c[0])


def complete(folder, files):
    """Whether a checkpoint folder holds all its files (the optimizer's is written last)."""
    try:
        if not all((folder / f"{name}.ckpt").exists() for name in files):
            return False
        torch.load(folder / "optimizer.ckpt", weights_only=True)
        return True
    except Exception:  # still being written
        return False


def run_to_end(cmd, cwd, env):
    """Runs ``cmd`` to its end; a failure shows the end of its output."""
    run = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])


def run_killed(cmd, cwd, env):
    """Runs ``cmd``, which kills itself, then kills what is left of it (torchrun's other
    workers, each in a session of its own) and returns its return code."""
    process = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        process.wait(timeout=240)
    finally:
        for pid in [process.pid, *descendants(process.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait()
    return process.returncode


def descendants(pid):
    """Pids of every process below ``pid`` (Linux /proc), deepest last."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


def same(a, b):
    """Exact equality of checkpoint contents (tensors with torch.equal)."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def log_lines(output):
    """The train log without the wall-clock field."""
    lines = (output / "train_log.txt").read_text().splitlines()
    return [re.sub(r", train epoch_s: [0-9.e+-]+", "", line) for line in lines]


class Regression(ExactResume, sb.Brain):
    """A linear layer fitted to targets: the smallest Brain that checkpoints and resumes."""

    def compute_forward(self, batch, stage):
        return self.modules.layer(batch[0])

    def compute_objectives(self, predictions, batch, stage):
        return torch.nn.functional.mse_loss(predictions, batch[1])


@pytest.mark.parametrize("case, processes", [("asr", 1), ("frame_dmoe", 1), ("frame_dmoe", 2)])
def test_killed_run_resumes_exactly(case, processes, tiny_corpus, tmp_path):
    files = COMMON_FILES + CASES[case][3]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run_to_end(command(case, tiny_corpus, reference, processes), tmp_path, env)

    killed = command(case, tiny_corpus, resumed, processes, killed_mid_epoch=tmp_path / "kill.py")
    returncode = run_killed(killed, tmp_path, env)
    # torchrun reports its killed worker as a failure of its own
    assert returncode == (-signal.SIGKILL if processes == 1 else 1)
    assert not (resumed / "results.json").exists()
    newest = [c for c in checkpoints(resumed / "save") if complete(c[1], files)][-1]
    assert "brain_intra_epoch_ckpt: true" in newest[2]  # resuming from mid-epoch
    assert int((newest[1] / "dataloader-TRAIN.ckpt").read_text()) > 0
    run = subprocess.run(command(case, tiny_corpus, resumed, processes), cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])

    # The final end-of-epoch checkpoints: every file equal, random states included.
    finals = []
    for output in (reference, resumed):
        ends = [c for c in checkpoints(output / "save") if "end-of-epoch: true" in c[2]]
        finals.append(ends[-1][1])
    assert (finals[0] / "counter.ckpt").read_text().strip() == str(EPOCHS)
    for name in files:
        if name == "dataloader-TRAIN":  # position only: text
            assert (finals[0] / f"{name}.ckpt").read_text() == (finals[1] / f"{name}.ckpt").read_text()
            continue
        if name in ("counter", "brain"):
            assert (finals[0] / f"{name}.ckpt").read_text() == (finals[1] / f"{name}.ckpt").read_text()
            continue
        got, expected = (torch.load(f / f"{name}.ckpt", weights_only=False) for f in finals)
        assert same(got, expected), name

    assert log_lines(resumed) == log_lines(reference)
    results = [json.loads((out / "results.json").read_text()) for out in (reference, resumed)]
    assert results[0] == results[1]


def test_each_epoch_checkpoint_costs_the_same_however_many_came_before(tmp_path):
    # SpeechBrain 1.1.2's save_and_keep_only grows a shared default list on every call, so
    # each save scanned the checkpoints once more than the one before (14 s an epoch after
    # 600 saves in one worker process). Counted here as checkpoint-folder scans per save.
    from speechbrain.utils.checkpoints import Checkpointer

    from sb_crossmodal_kd.resume import save_and_keep_best

    scans = []

    class CountingCheckpointer(Checkpointer):
        def list_checkpoints(self):
            scans[-1] += 1
            return super().list_checkpoints()

    checkpointer = CountingCheckpointer(tmp_path, {"layer": torch.nn.Linear(2, 2)})
    for epoch in range(30):
        scans.append(0)
        save_and_keep_best(checkpointer, {"WER": 50.0 - epoch, "curve": list(range(epoch))},
                           min_keys=["WER"])
    assert scans[-1] == scans[0] > 0, scans
    assert [c.meta["WER"] for c in checkpointer.list_checkpoints()] == [21.0]


def test_a_save_cut_while_writing_the_optimizer_is_set_aside_before_recovery(tmp_path):
    # The optimiser is registered last (by init_optimizers in on_fit_start), so a save's
    # optimizer.ckpt is the file a kill most often cuts: recovery must skip that checkpoint.
    from speechbrain.utils.checkpoints import Checkpointer

    def brain():
        layer = torch.nn.Linear(2, 1)
        return Regression({"layer": layer}, lambda params: torch.optim.SGD(params, lr=0.1),
                          run_opts={"device": "cpu"},
                          checkpointer=Checkpointer(tmp_path, {"layer": layer}))

    torch.manual_seed(0)
    data = [(torch.randn(4, 2), torch.randn(4, 1)) for _ in range(3)]
    trained = brain()
    trained.fit(range(1), data, progressbar=False)
    trained.checkpointer.save_checkpoint(name="good")
    good = {k: v.clone() for k, v in trained.modules.layer.state_dict().items()}
    trained.fit(range(1), data, progressbar=False)  # the weights move on
    cut = trained.checkpointer.save_checkpoint(name="cut")
    (cut.path / "optimizer.ckpt").write_bytes(b"")  # killed as it opened the last file

    resumed = brain()
    resumed.on_fit_start()
    assert not cut.path.exists() and cut.path.with_name("incomplete-CKPT+cut").is_dir()
    for name, value in resumed.modules.layer.state_dict().items():
        assert torch.equal(value, good[name]), name


def test_lines_a_killed_run_logged_after_its_last_checkpoint_are_not_repeated(tmp_path):
    # A run killed after logging part of an epoch (e.g. its train expert usage) but before
    # that epoch's checkpoint: the resumed run logs the epoch again, so the log must be cut
    # back to the checkpoint first. Evaluation's recovery of the best checkpoint cuts nothing.
    from speechbrain.utils.checkpoints import Checkpointer
    from speechbrain.utils.epoch_loop import EpochCounter
    from speechbrain.utils.train_logger import FileTrainLogger

    from sb_crossmodal_kd.resume import save_and_keep_best

    class LoggingRegression(Regression):
        def on_stage_end(self, stage, stage_loss, epoch=None):
            super().on_stage_end(stage, stage_loss, epoch)
            if stage == sb.Stage.TRAIN:
                self.hparams.train_logger.log_stats({"epoch": epoch, "part": "train"})
            elif stage == sb.Stage.VALID:
                self.hparams.train_logger.log_stats({"epoch": epoch}, valid_stats={"loss": 1.0})
                save_and_keep_best(self.checkpointer, {"loss": float(epoch)}, min_keys=["loss"])

    def brain(folder):
        layer = torch.nn.Linear(2, 1)
        counter = EpochCounter(2)
        return LoggingRegression({"layer": layer},
                                 lambda params: torch.optim.SGD(params, lr=0.1),
                                 hparams={"train_logger": FileTrainLogger(folder / "train_log.txt"),
                                   "epoch_counter": counter},
                          run_opts={"device": "cpu"},
                          checkpointer=Checkpointer(folder / "save",
                                                    {"layer": layer, "counter": counter}))

    torch.manual_seed(0)
    data = [(torch.randn(4, 2), torch.randn(4, 1)) for _ in range(3)]
    reference = brain(tmp_path / "reference")
    reference.fit(reference.hparams.epoch_counter, data, data, progressbar=False)
    expected = (tmp_path / "reference" / "train_log.txt").read_text()
    assert expected.count("\n") == 4

    killed = brain(tmp_path / "resumed")
    killed.hparams.epoch_counter.limit = 1
    killed.fit(killed.hparams.epoch_counter, data, data, progressbar=False)
    log = tmp_path / "resumed" / "train_log.txt"
    with open(log, "a") as handle:  # epoch 2's first line, then the kill
        handle.write("epoch: 2, part: train\n")
    resumed = brain(tmp_path / "resumed")
    resumed.fit(resumed.hparams.epoch_counter, data, data, progressbar=False)
    assert log.read_text() == expected
    assert log.with_name("train_log.txt.cut").read_text() == "epoch: 2, part: train\n"

    resumed.evaluate(data, min_key="loss", progressbar=False)  # recovers epoch 1's checkpoint
    assert log.read_text().startswith(expected)


def test_an_moe_run_continued_from_its_last_epoch_logs_as_one_run(tiny_corpus, tmp_path):
    # Trained one epoch (and tested), then run again for two: it resumes from the end-of-
    # epoch checkpoint, and its log reads like that of a run trained two epochs at once. The
    # valid expert usage, logged by the MoE mixin, must precede the epoch's checkpoint for
    # it to survive the cut back to that checkpoint.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference, continued = tmp_path / "reference", tmp_path / "continued"
    run_to_end(command("frame_dmoe", tiny_corpus, reference), tmp_path, env)
    first = [arg.replace(f"--number_of_epochs={EPOCHS}", "--number_of_epochs=1")
             for arg in command("frame_dmoe", tiny_corpus, continued)]
    run_to_end(first, tmp_path, env)
    assert any(line.startswith("epoch loaded: 1") for line in log_lines(continued))
    run_to_end(command("frame_dmoe", tiny_corpus, continued), tmp_path, env)
    lines = log_lines(continued)
    assert sum("valid" in line and "usage" in line for line in lines) == EPOCHS
    assert lines == log_lines(reference)
