"""Frame-level classification Brain (e.g. monophones), with MoE auxiliary losses and
expert-usage analysis: the setting of Eigen et al.'s (2013) speech experiment.

:class:`FrameClassifierBrain` trains any frame classifier; :class:`FrameBrain` is it with
:class:`~sb_crossmodal_kd.moe_brain.MoEMixin`, for models with MoE layers (a dense model
trains the same under either). They expect, in their ``modules``:

- ``compute_features``: waveform [B, S] -> features [B, T, F] (SpeechBrain's ``Fbank``),
- ``normalize``: SpeechBrain's ``InputNormalization``,
- ``model``: stacked-context features [B, T, F * (2 * context + 1)] -> logits [B, T, C];
  any module called as ``model(x)``: a Deep MoE classifier, a plain MLP, ... Its MoE layers
  get the padding from the Brain (the waveforms' relative lengths).

and in its ``hparams``: ``context``, ``num_classes``, ``log_softmax``, ``epoch_counter``,
``checkpointer``, ``train_logger``, ``output_folder``, and optionally ``class_names`` and
``tensorboard_logger``. Batches carry ``sig`` (waveforms) and ``frame_labels`` (one class
index per 10 ms feature frame, -1 for frames without a label).

At the end of each stage it logs loss, frame accuracy and (for MoE models) expert usage;
the test stage writes ``results.json`` and the expert-usage heat maps.
"""

import speechbrain as sb
import torch
import torch.nn.functional as F

from sb_crossmodal_kd.analysis.expert_usage import ExpertUsageTracker
from sb_crossmodal_kd.distributed import sum_across_processes
from sb_crossmodal_kd.io import atomic_write_json
from sb_crossmodal_kd.lengths import lengths_to_mask
from sb_crossmodal_kd.moe_brain import MoEMixin
from sb_crossmodal_kd.resume import ExactResume, save_and_keep_best
from sb_crossmodal_kd.stage_stats import log_stats, stage_loss_across_processes


def stack_context(feats, context):
    """Concatenates each frame with its ``context`` neighbours on each side.

    Edges repeat the first / last frame, so the output has as many frames as the input.

    Arguments
    ---------
    feats : torch.Tensor
        [B, T, F]
    context : int
        Frames on each side.

    Returns
    -------
    torch.Tensor
        [B, T, F * (2 * context + 1)], earliest frame first.

    Example
    -------
    >>> x = torch.arange(4.0).view(1, 4, 1)
    >>> stack_context(x, 1)[0]
    tensor([[0., 0., 1.],
            [0., 1., 2.],
            [1., 2., 3.],
            [2., 3., 3.]])
    """
    if context == 0:
        return feats
    time = feats.shape[1]
    padded = torch.cat(
        [feats[:, :1].expand(-1, context, -1), feats, feats[:, -1:].expand(-1, context, -1)],
        dim=1,
    )
    windows = [padded[:, i : i + time] for i in range(2 * context + 1)]
    return torch.cat(windows, dim=-1)


def align_labels(labels, label_lens, n_frames, frame_lens=None):
    """Padded label batch -> [B, n_frames] labels with -1 on padding.

    Arguments
    ---------
    labels : torch.Tensor
        [B, L] padded labels (as SpeechBrain's ``PaddedBatch`` gives them).
    label_lens : torch.Tensor
        [B] relative lengths.
    n_frames : int
        Frames of the model output.
    frame_lens : torch.Tensor, optional
        [B] relative lengths of the model's input (e.g. the waveforms'): frames past them,
        which the model's MoE layers treat as padding, get -1 as well (a label may overrun
        the audio by a frame or two).

    Example
    -------
    >>> align_labels(torch.tensor([[3, 4, 5], [6, 0, 0]]), torch.tensor([1.0, 1 / 3]), 4)
    tensor([[ 3,  4,  5, -1],
            [ 6, -1, -1, -1]])
    >>> align_labels(torch.tensor([[3, 4, 5], [6, 7, 0]]), torch.tensor([1.0, 2 / 3]), 3,
    ...              frame_lens=torch.tensor([1.0, 1 / 3]))
    tensor([[ 3,  4,  5],
            [ 6, -1, -1]])
    """
    batch, length = labels.shape
    keep = lengths_to_mask(label_lens, length)
    labels = torch.where(keep, labels.long(), -1)
    if length >= n_frames:
        labels = labels[:, :n_frames]
    else:
        labels = F.pad(labels, (0, n_frames - length), value=-1)
    if frame_lens is not None:
        labels = labels.masked_fill(~lengths_to_mask(frame_lens, n_frames), -1)
    return labels


def phone_frame_labels(phones, n_samples, rate, utterance_id, tolerance=2):
    """Labels 10 ms feature frames with the phone covering each frame's centre.

    Arguments
    ---------
    phones : list of (phone, start_s, end_s)
        Timed phones (e.g. the ``phones`` of a SynthCommands alignment), phones in
        :data:`~sb_crossmodal_kd.units.phones.PHONES`.
    n_samples : int
        Length of the audio.
    rate : sb_crossmodal_kd.alignment.framerate.FrameRate
        Frame geometry (feature frame ``t`` is centred at ``t * hop``).
    utterance_id : str
        Named in errors.
    tolerance : int
        Frames by which the phones may fall short of or overrun the audio.

    Returns
    -------
    torch.Tensor
        [1 + n_samples // hop] long labels, -1 where no phone covers the frame centre.

    Example
    -------
    >>> from sb_crossmodal_kd.alignment.framerate import FrameRate
    >>> phone_frame_labels([["sil", 0.0, 0.025], ["AA", 0.025, 0.05]], 800, FrameRate(), "u")
    tensor([ 0,  0,  0,  1,  1, -1])
    """
    from sb_crossmodal_kd.units.phones import phone_index

    n_frames = rate.feature_frames(n_samples)
    shift = rate.feature_shift_s
    try:
        segments = [(phone_index(p), float(start), float(end)) for p, start, end in phones]
    except ValueError as error:
        raise ValueError(f"utterance {utterance_id!r}: {error}") from error
    end = max((e for _, _, e in segments), default=0.0)
    audio_end = (n_frames - 1) * shift
    if abs(end - audio_end) > tolerance * shift + 1e-6:
        raise ValueError(
            f"utterance {utterance_id!r}: phones end at {end:.3f} s but the audio's last frame "
            f"is at {audio_end:.3f} s (tolerance {tolerance} frames); check that the "
            "alignment belongs to this audio"
        )
    labels = rate.segments_to_frames(segments, n_frames, shift_s=shift, fill=-1)
    return torch.from_numpy(labels).long()


class FrameClassifierBrain(ExactResume, sb.Brain):
    """Trains a frame classifier with cross-entropy over the labelled frames.

    Under DDP the train stage's loss and accuracy are those of all processes.
    """

    def compute_forward(self, batch, stage):
        """Returns log-probabilities [B, T, C]."""
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        feats = self.modules.compute_features(wavs)
        feats = self.modules.normalize(feats, wav_lens)
        feats = stack_context(feats, self.hparams.context)
        logits = self.modules.model(feats)
        return self.hparams.log_softmax(logits)

    @staticmethod
    def frame_targets(predictions, batch):
        """[B, T] class per output frame, -1 on frames without a label (:func:`align_labels`)."""
        labels, label_lens = batch.frame_labels
        # frames past the audio's relative length are padding to the model: no label there
        return align_labels(labels, label_lens, predictions.shape[1], frame_lens=batch.sig[1])

    def compute_objectives(self, predictions, batch, stage):
        """Frame cross-entropy over labelled frames; counts the frames classified right."""
        labels = self.frame_targets(predictions, batch)
        loss = F.nll_loss(predictions.float().transpose(1, 2), labels, ignore_index=-1)
        with torch.no_grad():
            labelled = labels >= 0
            self.correct += ((predictions.argmax(-1) == labels) & labelled).sum()
            self.labelled += labelled.sum()
        return loss

    def on_stage_start(self, stage, epoch=None):
        """Resets the accuracy counts."""
        super().on_stage_start(stage, epoch)
        self.correct = torch.zeros((), dtype=torch.long, device=self.device)
        self.labelled = torch.zeros((), dtype=torch.long, device=self.device)

    def intra_epoch_state(self):
        """The epoch's accuracy counts, for a mid-epoch checkpoint."""
        return {**super().intra_epoch_state(), "correct": self.correct.cpu(),
                "labelled": self.labelled.cpu()}

    def load_intra_epoch_state(self, state):
        super().load_intra_epoch_state(state)
        self.correct = state["correct"].to(self.device)
        self.labelled = state["labelled"].to(self.device)

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Logs loss and frame accuracy; checkpoints; writes test results."""
        super().on_stage_end(stage, stage_loss, epoch)
        # Each process trained on its share of the data; valid and test ran in full on each.
        correct, labelled = self.correct, self.labelled
        if stage == sb.Stage.TRAIN:
            correct, labelled = sum_across_processes([correct, labelled])
        stage_loss = stage_loss_across_processes(stage, stage_loss, self.device)
        accuracy = float(correct) / max(int(labelled), 1)
        stats = {"loss": stage_loss, "frame_acc": round(accuracy, 4)}
        if stage == sb.Stage.TRAIN:
            self.train_stats = stats
        elif stage == sb.Stage.VALID:
            log_stats(self.hparams, stats_meta={"epoch": epoch}, train_stats=self.train_stats,
                      valid_stats=stats)
            save_and_keep_best(self.checkpointer, {"frame_acc": accuracy},
                               max_keys=["frame_acc"])
        else:
            log_stats(self.hparams,
                      stats_meta={"epoch loaded": self.hparams.epoch_counter.current},
                      test_stats=stats)
            # Every process ran the whole test set; each keeps the results, one writes them.
            results = self.frame_results(accuracy, stage_loss)
            if sb.utils.distributed.if_main_process():
                atomic_write_json(f"{self.hparams.output_folder}/results.json", results)
            self.test_results = results

    def frame_results(self, accuracy, stage_loss):
        """What ``results.json`` keeps of the test pass; a subclass adds its own entries."""
        return {
            "frame_accuracy": accuracy,
            "test_loss": stage_loss,
            "labelled_frames": int(self.labelled),
            "params": sum(p.numel() for p in self.modules.model.parameters()),
            "epochs": self.hparams.epoch_counter.current,
        }


class FrameBrain(MoEMixin, FrameClassifierBrain):
    """Trains a frame classifier with cross-entropy plus every MoE layer's auxiliary loss
    (in every stage), and analyses its expert usage in every stage: per layer, joint
    usage of consecutive layers, expert paths and usage by class (``hparams.num_classes``,
    ``class_names``), logged at the end of each stage, in the test results and drawn in
    ``expert_usage/`` beside them.

    Under DDP the train stage's loss, accuracy and expert usage are those of all processes.
    """

    moe_module = "model"
    expert_usage_tracked = expert_usage_logged = (sb.Stage.TRAIN, sb.Stage.VALID, sb.Stage.TEST)
    plot_train_expert_usage = False

    def expert_usage_tracker(self):
        """A tracker counting usage by frame class."""
        return ExpertUsageTracker(num_classes=self.hparams.num_classes,
                                  class_names=getattr(self.hparams, "class_names", None))

    def expert_usage_labels(self, predictions, batch):
        """The frame labels (:meth:`frame_targets`)."""
        return self.frame_targets(predictions, batch)

    def frame_results(self, accuracy, stage_loss):
        """The classifier's results with the test pass's expert usage."""
        return self.results_with_expert_usage(super().frame_results(accuracy, stage_loss))
