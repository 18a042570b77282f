"""Exact resume: a run killed mid-epoch and re-run ends with the weights of an uninterrupted run.

SpeechBrain 1.1.2 checkpoints (also every ``ckpt_interval_steps`` batches or
``ckpt_interval_minutes`` within an epoch) the modules, optimiser, scheduler, epoch counter,
the Brain's step and running train loss, and the train loader's position, which it skips
to on recovery. Samplers are seeded by seed + epoch. Two things are missing, and this
module adds them for every Brain of the package:

- the random number generators (torch CPU and CUDA, numpy, Python ``random``) that dropout,
  noisy gating and the like draw from, per process under DDP;
- a Brain's own running values of the epoch (e.g. the distillation Brain's loss-term sums),
  which ``on_stage_start`` would otherwise reset on resume, and under DDP each rank's
  running train loss (SpeechBrain's ``brain.ckpt`` holds the main process's);
- the length of the train log (``train_logger``'s file): lines a killed run wrote after
  its last checkpoint are moved to ``<log>.cut`` on resume, since the resumed run writes
  them again.

Timing matters. Creating the train loader's iterator draws from the global torch generator
(its base seed), before the recovered loader skips the batches already done. So the state
of a mid-epoch checkpoint is put back just before the next training batch runs (or at the
end of the train stage if no batch is left), exactly where the uninterrupted run stood when
it saved. An end-of-epoch checkpoint's state is put back at once, before the next epoch's
loader draws.

A run killed while SpeechBrain writes a checkpoint leaves a folder with ``CKPT.yaml`` but
missing or truncated files, which recovery would pick and fail on; such folders are renamed
``incomplete-<name>`` (kept, not deleted) before recovery, so the last complete checkpoint
is used (:func:`set_aside_incomplete_checkpoints`).

Limits: randomness drawn by loader worker processes (``num_workers > 0``) follows the base
seed of the resumed iterator, not the original one; the pipelines of this package draw none.
"""

import logging
import os
import random
import warnings
import zipfile
from pathlib import Path

import numpy as np
import speechbrain as sb
import torch
from speechbrain.utils.checkpoints import mark_as_loader, mark_as_saver, register_checkpoint_hooks
from speechbrain.utils.distributed import if_main_process

from sb_crossmodal_kd.distributed import gather_objects, rank, world_size
from sb_crossmodal_kd.io import atomic_path
from sb_crossmodal_kd.stage_stats import train_loggers

logger = logging.getLogger(__name__)


def capture_random_state():
    """The states of torch (CPU and initialised CUDA devices), numpy and Python ``random``,
    as tensors and plain Python values (loadable with ``torch.load(weights_only=True)``).

    Example
    -------
    >>> state = capture_random_state()
    >>> a = torch.rand(3), np.random.rand(), random.random()
    >>> restore_random_state(state)
    >>> b = torch.rand(3), np.random.rand(), random.random()
    >>> torch.equal(a[0], b[0]) and a[1:] == b[1:]
    True
    """
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss),
                  float(cached_gaussian)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_random_state(state):
    """Puts back what :func:`capture_random_state` returned."""
    torch.set_rng_state(state["torch"])
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss,
                         cached_gaussian))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainingState:
    """Checkpoint recoverable of the random states and the Brain's running epoch values.

    Its save hook runs on every process (a collective under DDP: each rank's state is
    gathered, the main process writes them all); on load each rank takes its own.

    Arguments
    ---------
    brain : speechbrain.Brain, optional
        Its ``intra_epoch_state()`` (a dict of plain values and CPU tensors) is saved and
        handed back to ``load_intra_epoch_state(state)`` on a mid-epoch resume.

    Example
    -------
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "training_state.ckpt"
    >>> saved = TrainingState()
    >>> saved.save(path)
    >>> a = torch.rand(2)
    >>> loaded = TrainingState()
    >>> loaded.load(path, end_of_epoch=False)  # mid-epoch: pending until the next batch
    >>> loaded.apply_pending()
    True
    >>> torch.equal(torch.rand(2), a)
    True
    """

    def __init__(self, brain=None):
        self.brain = brain
        self.pending = None
        self.log_sizes = None

    def _log_files(self):
        """The text files the Brain's train loggers append to (SpeechBrain's
        ``FileTrainLogger``); other loggers are left alone."""
        hparams = getattr(self.brain, "hparams", None)
        if hparams is None or getattr(hparams, "train_logger", None) is None:
            return []
        return [Path(logger.save_file) for logger in train_loggers(hparams)
                if isinstance(getattr(logger, "save_file", None), str | Path)]

    @mark_as_saver
    def save(self, path):
        """Gathers every rank's state; the main process writes them (atomically)."""
        local = {"random": capture_random_state(), "epoch": {}}
        if self.brain is not None:
            local["epoch"] = self.brain.intra_epoch_state()
            # SpeechBrain saves the main process's running loss only; each rank has its own.
            local["avg_train_loss"] = float(self.brain.avg_train_loss)
            if if_main_process():  # the one writer of the logs
                # by logger, not path: a run folder that was moved still resumes
                local["log_sizes"] = [file.stat().st_size if file.is_file() else 0
                                      for file in self._log_files()]
        states = gather_objects(local)
        if if_main_process():
            with atomic_path(path) as tmp:
                torch.save({"ranks": states}, tmp)

    @mark_as_loader
    def load(self, path, end_of_epoch):
        """Restores the random state now (end of epoch) or before the next batch (mid-epoch)."""
        states = torch.load(path, weights_only=True)["ranks"]
        if len(states) == world_size():
            mine = states[rank()]
        else:
            warnings.warn(
                f"{path} holds the random states of {len(states)} processes but this run has "
                f"{world_size()}: the run continues, but not exactly as the original would",
                stacklevel=2,
            )
            mine = states[min(rank(), len(states) - 1)]
        self.log_sizes = mine.get("log_sizes")
        if end_of_epoch:
            restore_random_state(mine["random"])
            self.pending = None
        else:
            self.pending = mine

    def apply_pending(self):
        """Applies a mid-epoch state loaded earlier; returns whether there was one."""
        if self.pending is None:
            return False
        restore_random_state(self.pending["random"])
        if self.brain is not None:
            if self.pending["epoch"]:
                self.brain.load_intra_epoch_state(self.pending["epoch"])
            self.brain.avg_train_loss = self.pending.get("avg_train_loss",
                                                         self.brain.avg_train_loss)
        self.pending = None
        return True

    def trim_logs(self):
        """Cuts each train log back to its length at the checkpoint loaded last, appending what
        it cuts to ``<log>.cut`` beside it (main process; logs not in that checkpoint, or
        shorter than recorded, are left as they are); returns the files cut. Called once the run has recovered, never on evaluation's recovery of
        the best checkpoint, which must keep the later epochs' lines."""
        sizes, self.log_sizes = self.log_sizes, None
        files = self._log_files()
        if not sizes or len(sizes) != len(files) or not if_main_process():
            return []
        cut = []
        for file, size in zip(files, sizes, strict=True):
            if file.is_file() and file.stat().st_size > size:
                kept = file.with_name(file.name + ".cut")
                with open(file, "r+b") as handle:
                    handle.seek(size)
                    tail = handle.read()
                    with open(kept, "ab") as aside:  # kept, not lost: e.g. an earlier test pass
                        aside.write(tail)
                        aside.flush()
                        os.fsync(aside.fileno())
                    handle.truncate(size)
                cut.append(file)
                logger.info("%s: cut back to its last checkpoint, which the run resumes from "
                            "(the %d bytes after it are appended to %s)", file, len(tail), kept)
        return cut


# Not main-only: every rank must take part in the gather of the save hook.
register_checkpoint_hooks(TrainingState, save_on_main_only=False)


def _incomplete_file(path):
    """Why a checkpoint file cannot be complete, or None: missing, empty, or a torch zip
    archive without its central directory (written last, so a cut-off save lacks it) or
    with a member that does not match its checksum."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    if path.stat().st_size == 0:
        return "empty"
    with open(path, "rb") as handle:
        is_zip = handle.read(4) == b"PK\x03\x04"
    if is_zip:
        try:
            with zipfile.ZipFile(path) as archive:
                if archive.testzip() is not None:
                    return "corrupt"
        except (zipfile.BadZipFile, EOFError, OSError):
            return "truncated"
    return None


def save_and_keep_best(checkpointer, meta, min_keys=(), max_keys=()):
    """Saves an end-of-epoch checkpoint and keeps the best one (lowest of ``min_keys``,
    highest of ``max_keys``) and the most recent: ``Checkpointer.save_and_keep_only``, with
    a fresh ``importance_keys`` list on every call.

    SpeechBrain 1.1.2's ``save_and_keep_only`` appends its recency key to the default
    ``importance_keys`` list, a mutable default shared by every call in the process, and
    scans the checkpoint folder twice per key: after ``n`` saves each save reads every
    ``CKPT.yaml`` ``2 n`` times more, across all the runs a worker process trains (measured:
    14 s an epoch after 600 saves, for an epoch of 1.3 s). Passing the list makes each save
    cost the same.

    Example
    -------
    >>> import tempfile
    >>> from speechbrain.utils.checkpoints import Checkpointer
    >>> checkpointer = Checkpointer(tempfile.mkdtemp(), {"layer": torch.nn.Linear(2, 2)})
    >>> for wer in (30.0, 20.0, 25.0):
    ...     save_and_keep_best(checkpointer, {"WER": wer}, min_keys=["WER"])
    >>> sorted(c.meta["WER"] for c in checkpointer.list_checkpoints())  # best and last
    [20.0, 25.0]
    """
    checkpointer.save_and_keep_only(meta=meta, min_keys=list(min_keys), max_keys=list(max_keys),
                                    importance_keys=[])


def set_aside_incomplete_checkpoints(checkpointer):
    """Renames checkpoint folders that a killed save left incomplete to ``incomplete-<name>``.

    A folder is incomplete when a recoverable that is not optional has no file, or a file is
    empty or truncated. Nothing is deleted, and complete checkpoints are untouched.

    Arguments
    ---------
    checkpointer : speechbrain.utils.checkpoints.Checkpointer

    Returns
    -------
    list of Path
        The renamed folders.

    Example
    -------
    >>> import tempfile
    >>> from speechbrain.utils.checkpoints import Checkpointer
    >>> folder = tempfile.mkdtemp()
    >>> checkpointer = Checkpointer(folder, {"model": torch.nn.Linear(2, 2)})
    >>> good = checkpointer.save_checkpoint(name="good")
    >>> cut = checkpointer.save_checkpoint(name="cut")
    >>> data = (cut.path / "model.ckpt").read_bytes()
    >>> _ = (cut.path / "model.ckpt").write_bytes(data[: len(data) // 2])  # a killed save
    >>> [p.name for p in set_aside_incomplete_checkpoints(checkpointer)]
    ['incomplete-CKPT+cut']
    >>> checkpointer.find_checkpoint().path.name
    'CKPT+good'
    """
    moved = []
    for checkpoint in checkpointer.list_checkpoints():
        problems = {
            name: _incomplete_file(checkpoint.path / f"{name}.ckpt")
            for name in checkpointer.recoverables
        }
        problems = {
            name: why for name, why in problems.items()
            if why and not (why == "missing" and checkpointer.optional_recoverables.get(name))
        }
        if problems:
            target = checkpoint.path.with_name("incomplete-" + checkpoint.path.name)  # not listed
            checkpoint.path.rename(target)
            logger.warning(
                "%s is incomplete (%s): a save was interrupted. Moved to %s; recovering from "
                "the last complete checkpoint.", checkpoint.path,
                ", ".join(f"{name}.ckpt {why}" for name, why in sorted(problems.items())), target,
            )
            moved.append(target)
    return moved


class ExactResume:
    """Brain mixin (list it before ``speechbrain.Brain``) for exact resume.

    It registers a :class:`TrainingState` named ``training_state`` with the checkpointer
    (optional on load, so checkpoints written before it still load), applies a mid-epoch
    state before the next training batch, and gives a train sampler or batch sampler passed
    in the loader options its epoch each epoch (SpeechBrain does this only for samplers it
    creates itself, or under DDP), so that the data order is a function of seed and epoch.

    Subclasses that keep running values over an epoch override :meth:`intra_epoch_state`
    and :meth:`load_intra_epoch_state`, and call ``super().on_stage_end(...)``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.training_state = TrainingState(self)
        if self.checkpointer is not None:
            self.checkpointer.add_recoverable(
                "training_state", self.training_state, optional_load=True
            )

    def init_optimizers(self):
        """SpeechBrain's, then sets aside checkpoints left incomplete by a killed save.

        Here, not earlier in ``on_fit_start``: the optimiser is the last recoverable
        registered (by ``init_optimizers``) and so the last file a save writes, the one a
        kill most often cuts; ``recover_if_possible`` runs next."""
        super().init_optimizers()
        if self.checkpointer is not None:
            sb.utils.distributed.run_on_main(
                set_aside_incomplete_checkpoints, args=[self.checkpointer]
            )

    def on_fit_start(self):
        """SpeechBrain's, which recovers the latest checkpoint; then cuts the train log back
        to that checkpoint (:meth:`TrainingState.trim_logs`)."""
        super().on_fit_start()
        self.training_state.trim_logs()

    def resumed_curve(self, key):
        """The per-epoch values kept under ``key`` in the latest checkpoint's meta (e.g. a
        valid WER curve), so a resumed run continues its curve; ``[]`` on a fresh start
        (mid-epoch checkpoints carry no curve)."""
        if self.checkpointer is None:
            return []
        found = self.checkpointer.find_checkpoint(ckpt_predicate=lambda ckpt: key in ckpt.meta)
        return [] if found is None else list(found.meta[key])

    def intra_epoch_state(self):
        """Running values of the current epoch to save mid-epoch (plain values, CPU tensors)."""
        return {}

    def load_intra_epoch_state(self, state):
        """Puts back what :meth:`intra_epoch_state` returned."""

    def on_fit_batch_start(self, batch, should_step):
        """Applies a pending mid-epoch state before the batch's forward pass."""
        self.training_state.apply_pending()
        super().on_fit_batch_start(batch, should_step)

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """A checkpoint taken after the epoch's last batch left nothing to run: apply it now."""
        if stage == sb.Stage.TRAIN:
            self.training_state.apply_pending()
        super().on_stage_end(stage, stage_loss, epoch)

    def make_dataloader(self, dataset, stage, ckpt_prefix="dataloader-", **loader_kwargs):
        """SpeechBrain's loader; also remembers a given train sampler to set its epoch."""
        loader = super().make_dataloader(dataset, stage, ckpt_prefix, **loader_kwargs)
        if stage == sb.Stage.TRAIN and self.train_sampler is None:
            sampler = loader_kwargs.get("batch_sampler") or loader_kwargs.get("sampler")
            if hasattr(sampler, "set_epoch"):
                self.train_sampler = sampler
        return loader
