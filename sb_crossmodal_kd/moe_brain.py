"""The Brain mixin for models with mixture-of-experts layers.

:class:`MoEMixin` gives any SpeechBrain Brain whose modules hold
:class:`~sb_crossmodal_kd.nnet.moe.MoE` layers, wherever they are (found by
:func:`~sb_crossmodal_kd.nnet.moe.moe_layers`), what those layers need from a Brain:

- padding: for the forward pass, every MoE layer gets the batch's relative input lengths
  (:func:`~sb_crossmodal_kd.nnet.moe.padding_mask`), since SpeechBrain's encoder layers call
  their feed-forward module without a mask (an encoder that passes its exact mask, as one
  made by :func:`~sb_crossmodal_kd.nnet.conformer_moe.use_moe_ffn` does, overrides it);
- the epoch, at the start of each training epoch, for the balancing constraints;
- the auxiliary losses (load balancing, router z-loss) of every forward pass, added to the
  Brain's objective (:meth:`MoEMixin.add_moe_loss` decides how);
- expert usage: each stage counts its own frames; the stages in
  :attr:`MoEMixin.expert_usage_logged` log per layer gate entropy and the least and most used
  expert's share of the gate mass (TensorBoard too when the hparams have a
  ``tensorboard_logger``); the stages in :attr:`MoEMixin.expert_usage_tracked` also count
  the joint usage of consecutive layers and the expert paths used; the test pass's usage
  goes into the Brain's results (:meth:`MoEMixin.results_with_expert_usage`) and its heat
  maps into ``expert_usage/`` beside them;
- mid-epoch checkpoints keep the usage counts of the epoch (with
  :class:`~sb_crossmodal_kd.resume.ExactResume`).

Under DDP the train stage's usage is that of all processes. A Brain without MoE layers runs
as if the mixin were not there.
"""

import contextlib
import logging
from pathlib import Path

import speechbrain as sb
import torch

from sb_crossmodal_kd.analysis.expert_usage import (
    ExpertUsageTracker,
    expert_usage_report,
    log_expert_usage,
    plot_expert_usage,
    usage_results,
)
from sb_crossmodal_kd.lengths import input_lengths
from sb_crossmodal_kd.nnet import moe
from sb_crossmodal_kd.stage_stats import train_loggers

logger = logging.getLogger(__name__)

__all__ = ["MoEMixin"]


class MoEMixin:
    """Padding, epoch, auxiliary losses and expert-usage statistics of a Brain's MoE layers.

    Put it before the Brain that runs the model: ``class MyBrain(MoEMixin, Brain)``. It wraps
    that Brain's ``compute_forward`` (the padding) and ``compute_objectives`` (the auxiliary
    losses and usage tracking), and its ``on_stage_start`` and ``on_stage_end`` (epoch, usage
    logging); nothing of the Brain's own code changes. Module docstring: what it does.

    A Brain adapts it through a few class attributes and methods: :attr:`moe_module`,
    :attr:`expert_usage_tracked`, :attr:`expert_usage_logged`,
    :attr:`plot_train_expert_usage`, :meth:`moe_input_lengths`, :meth:`add_moe_loss`,
    :meth:`expert_usage_tracker` and :meth:`expert_usage_labels`.

    Example
    -------
    >>> from sb_crossmodal_kd.nnet.moe import MoE
    >>> class Tiny(sb.Brain):
    ...     def compute_forward(self, batch, stage):
    ...         return self.modules.model(batch.sig.data)
    ...     def compute_objectives(self, predictions, batch, stage):
    ...         return predictions.pow(2).mean()
    >>> class TinyMoE(MoEMixin, Tiny):
    ...     pass
    >>> brain = TinyMoE(modules={"model": MoE(4, 2, z_loss_weight=1.0)},
    ...                 run_opts={"device": "cpu"})
    >>> from types import SimpleNamespace
    >>> from speechbrain.dataio.batch import PaddedData
    >>> batch = SimpleNamespace(sig=PaddedData(torch.randn(2, 3, 4), torch.tensor([1.0, 1 / 3])))
    >>> brain.on_stage_start(sb.Stage.VALID)
    >>> predictions = brain.compute_forward(batch, sb.Stage.VALID)
    >>> int(torch.count_nonzero(predictions[1, 1:]))  # padding: no expert, zero output
    0
    >>> loss = brain.compute_objectives(predictions, batch, sb.Stage.VALID)
    >>> bool(loss > predictions.pow(2).mean())  # plus the router z-loss
    True
    """

    moe_module = None
    """The name of the module holding the MoE layers in ``modules`` (layer names in logs and
    results are relative to it), or None: all modules."""

    expert_usage_tracked = (sb.Stage.TEST,)
    """Stages that count cross-layer usage (joint usage, expert paths, usage by class)."""

    expert_usage_logged = (sb.Stage.TRAIN,)
    """Stages whose expert usage is logged at their end."""

    plot_train_expert_usage = True
    """Whether the last training epoch's usage is drawn (``train_expert_usage`` heat maps)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.has_moe = len(moe.moe_layers(self.moe_model)) > 0
        self.usage_tracker = None  # an ExpertUsageTracker during the tracked stages
        self._usage_report = None  # the current stage's, once read

    @property
    def moe_model(self):
        """The module whose MoE layers the Brain handles (:attr:`moe_module`)."""
        return self.modules if self.moe_module is None else self.modules[self.moe_module]

    @staticmethod
    def moe_input_lengths(batch):
        """``[B]`` relative lengths of the batch's input, which the MoE layers take as their
        padding (``feats`` if cached, else ``sig``)."""
        return input_lengths(batch)

    def moe_padding(self, batch):
        """Context manager giving the MoE layers the batch's padding for one forward pass."""
        if not self.has_moe:
            return contextlib.nullcontext()
        lengths = self.moe_input_lengths(batch).to(self.device)
        return moe.padding_mask(self.moe_model, lengths=lengths)

    # Forward and objectives --------------------------------------------------------------

    def compute_forward(self, batch, stage):
        """The Brain's own forward pass, with the MoE layers told the batch's padding."""
        with self.moe_padding(batch):
            return super().compute_forward(batch, stage)

    def compute_objectives(self, predictions, batch, stage):
        """The Brain's own loss with the MoE layers' auxiliary losses (:meth:`add_moe_loss`);
        counts the forward pass's routing in the tracked stages."""
        loss = super().compute_objectives(predictions, batch, stage)
        if not self.has_moe:
            return loss
        # Collected in every stage: a layer keeps only its latest pass's loss.
        moe_loss = moe.moe_auxiliary_loss(self.moe_model)
        if self.usage_tracker is not None:
            with torch.no_grad():
                labels = self.expert_usage_labels(predictions, batch)
                self.usage_tracker.update(self.moe_model, labels=labels)
        return self.add_moe_loss(loss, moe_loss, stage)

    def add_moe_loss(self, loss, moe_loss, stage):
        """The objective from the Brain's ``loss`` and the MoE layers' summed auxiliary
        ``moe_loss`` of the batch: their sum (in every stage) unless a Brain says otherwise."""
        return loss + moe_loss

    def expert_usage_labels(self, predictions, batch):
        """``[B, T]`` class per frame at the MoE layers' frame rate (-1: none), for usage by
        class; None (the default): no classes."""
        return None

    def expert_usage_tracker(self):
        """A fresh :class:`~sb_crossmodal_kd.analysis.expert_usage.ExpertUsageTracker` for a
        tracked stage."""
        return ExpertUsageTracker()

    # Stages ----------------------------------------------------------------------------------

    def on_stage_start(self, stage, epoch=None):
        """Tells the balancing constraints the epoch; each stage counts its own frames."""
        super().on_stage_start(stage, epoch)
        self.usage_tracker, self._usage_report = None, None
        if not self.has_moe:
            return
        if stage == sb.Stage.TRAIN and epoch is not None:
            moe.set_moe_epoch(self.moe_model, epoch)
        moe.reset_expert_stats(self.moe_model)
        if stage in self.expert_usage_tracked:
            self.usage_tracker = self.expert_usage_tracker()

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Logs the stage's expert usage (logged stages) before the Brain's own end of
        stage, which checkpoints after validation: a checkpoint then covers every line its
        epoch logged, and a resumed run, which cuts the log back to its checkpoint, loses
        none. After it: draws the last training epoch's usage, and the test pass's when the
        Brain's results did not take it (:meth:`test_expert_usage`)."""
        if self.has_moe and stage in self.expert_usage_logged:
            report = self.expert_usage(stage)
            step = epoch if epoch is not None else self.hparams.epoch_counter.current
            for train_logger in train_loggers(self.hparams):
                log_expert_usage(train_logger, report, step, stage=stage.name.lower())
        super().on_stage_end(stage, stage_loss, epoch)
        if not self.has_moe:
            return
        if (stage == sb.Stage.TRAIN and self.plot_train_expert_usage
                and epoch == getattr(self.hparams.epoch_counter, "limit", None)):
            report = self.expert_usage(stage)  # all ranks: a collective in training
            if sb.utils.distributed.if_main_process():
                plot_expert_usage(report, self.expert_usage_folder(),
                                  prefix="train_expert_usage")
        if stage == sb.Stage.TEST and self.usage_tracker is not None:
            if sb.utils.distributed.if_main_process():  # as results files: one writer
                self.test_expert_usage()
                logger.info("Expert usage of the test pass: %s", self.expert_usage_folder())
            self.usage_tracker = None

    def expert_usage(self, stage):
        """The stage's usage report (:func:`~sb_crossmodal_kd.analysis.expert_usage.
        expert_usage_report`), read once per stage, which resets the counters; in training,
        that of all processes (a collective: every rank calls it)."""
        if self._usage_report is None:
            self._usage_report = expert_usage_report(
                self.moe_model, self.usage_tracker, reset=True,
                across_processes=stage == sb.Stage.TRAIN,
            )
        return self._usage_report

    def expert_usage_folder(self):
        """Where heat maps and usage reports go: ``expert_usage/`` beside the results file
        (``hparams.results_file``), else in ``hparams.output_folder``."""
        results_file = getattr(self.hparams, "results_file", None)
        folder = Path(results_file).parent if results_file else Path(self.hparams.output_folder)
        return folder / "expert_usage"

    def test_expert_usage(self):
        """The test pass's expert usage (:func:`~sb_crossmodal_kd.analysis.expert_usage.
        usage_results`), its heat maps and full report written to
        :meth:`expert_usage_folder` by the main process; once per test pass (None after,
        and without MoE layers)."""
        if self.usage_tracker is None:
            return None
        report = self.expert_usage(sb.Stage.TEST)
        self.usage_tracker = None
        if sb.utils.distributed.if_main_process():
            plot_expert_usage(report, self.expert_usage_folder())
        return usage_results(report)

    def results_with_expert_usage(self, results):
        """``results`` (a Brain's test results) with the test pass's expert usage added
        (:meth:`test_expert_usage`), unchanged without MoE layers."""
        usage = self.test_expert_usage()
        if usage is not None:
            results.update(usage)
        return results

    # Mid-epoch checkpoints ---------------------------------------------------------------

    def intra_epoch_state(self):
        """The Brain's own epoch state plus the MoE layers' usage counters (and the
        tracker's counts in a tracked stage)."""
        base = getattr(super(), "intra_epoch_state", None)
        state = base() if base is not None else {}
        if self.has_moe:
            state["experts"] = moe.expert_counters(self.moe_model)
            if self.usage_tracker is not None:
                state["tracker"] = self.usage_tracker.state()
        return state

    def load_intra_epoch_state(self, state):
        """Puts back what :meth:`intra_epoch_state` returned (checkpoints made before it
        kept the counters have none)."""
        base = getattr(super(), "load_intra_epoch_state", None)
        if base is not None:
            base(state)
        if self.has_moe and "experts" in state:
            moe.load_expert_counters(self.moe_model, state["experts"])
        if self.usage_tracker is not None and "tracker" in state:
            self.usage_tracker.load_state(state["tracker"], self.device)
