"""The baseline acoustic model Brain: CTC over SentencePiece subwords.

``CTCBrain`` is a ``speechbrain.core.Brain`` that expects, in its ``modules``:

- ``compute_features``: waveform [B, S] -> features [B, T, F] (e.g. SpeechBrain's ``Fbank``),
- ``normalize``: SpeechBrain's ``InputNormalization`` (stateful, checkpointed),
- ``encoder``: ``encoder(features, lengths) -> [B, T', D]``
  (e.g. :class:`~sb_crossmodal_kd.nnet.conformer.ConformerCTCEncoder`); an encoder whose
  ``takes_waveforms`` is True (:mod:`sb_crossmodal_kd.nnet.pretrained`) gets the waveforms
  and their lengths instead, and ``compute_features`` and ``normalize`` are not used,
- ``ctc_lin``: the output projection to ``vocab_size + 1`` classes,

and in its ``hparams``: ``tokenizer`` (SpeechBrain's SentencePiece wrapper), ``blank_index``,
``log_softmax``, ``lr_annealing`` (stepped every batch), ``epoch_counter``, ``checkpointer``,
``train_logger``, ``wer_file`` and ``results_file`` (test WER and CER, and
``valid_wer_curve``: the valid WER after every epoch, also logged at the end). Subclasses (e.g. the distillation Brain)
extend :meth:`compute_forward`'s returned dict and :meth:`compute_objectives`.
"""

import logging
import time

import speechbrain as sb
from speechbrain.utils.metric_stats import ErrorRateStats

from sb_crossmodal_kd.distributed import unwrap
from sb_crossmodal_kd.io import atomic_write_json
from sb_crossmodal_kd.lengths import input_lengths
from sb_crossmodal_kd.moe_brain import MoEMixin
from sb_crossmodal_kd.nnet.moe import moe_layers
from sb_crossmodal_kd.resume import ExactResume, save_and_keep_best
from sb_crossmodal_kd.stage_stats import log_stats, stage_loss_across_processes, train_loggers

__all__ = ["CTCBrain", "count_parameters", "encode_waveforms", "train_loggers"]

logger = logging.getLogger(__name__)


def encode_waveforms(wavs, wav_lens, encoder, compute_features, normalize):
    """The encoder's output ``[B, T', D]`` for waveforms ``[B, S]`` (relative lengths ``[B]``).

    Features and their normalisation come first, unless the encoder reads the audio itself
    (``takes_waveforms``: the pretrained front ends of :mod:`sb_crossmodal_kd.nnet.pretrained`).
    Training (:class:`CTCBrain`) and the exported model
    (:class:`sb_crossmodal_kd.inference.CTCAcousticModel`) both run this.

    Example
    -------
    >>> import torch
    >>> from speechbrain.lobes.features import Fbank
    >>> from speechbrain.processing.features import InputNormalization
    >>> from sb_crossmodal_kd.nnet.conformer import ConformerCTCEncoder
    >>> encoder = ConformerCTCEncoder(n_mels=20, d_model=16, num_layers=1, nhead=2, d_ffn=32)
    >>> encoded = encode_waveforms(torch.randn(2, 16000), torch.tensor([1.0, 0.5]), encoder,
    ...                            Fbank(n_mels=20), InputNormalization(norm_type="sentence"))
    >>> encoded.shape
    torch.Size([2, 26, 16])
    """
    if getattr(unwrap(encoder), "takes_waveforms", False):
        return encoder(wavs, wav_lens)
    return encoder(normalize(compute_features(wavs), wav_lens), wav_lens)


class CTCBrain(ExactResume, sb.Brain):
    """Trains and evaluates a CTC acoustic model; writes WER/CER of the test split to JSON.

    Resumes exactly from mid-epoch checkpoints (:class:`~sb_crossmodal_kd.resume.ExactResume`);
    under DDP the logged train loss is the mean over all processes.
    """

    input_lengths = staticmethod(input_lengths)

    def compute_forward(self, batch, stage):
        """Returns ``{"log_probs": [B, T', V+1], "encoded": [B, T', D], "lengths": [B]}``.

        The features are the batch's cached ``feats`` when the dataset provides them, else
        computed from ``sig``; in training, ``hparams.fea_augment`` (e.g. SpeechBrain's
        ``Augmenter`` with ``SpectrogramDrop`` in time and frequency: SpecAugment), if
        set, transforms the normalised features. It must keep their length, which frame
        alignments of the KD recipe rely on.
        """
        batch = batch.to(self.device)
        if hasattr(batch, "feats"):
            feats, lengths = batch.feats
        else:
            wavs, lengths = batch.sig
            if getattr(unwrap(self.modules.encoder), "takes_waveforms", False):
                feats = None
                encoded = self.modules.encoder(wavs, lengths)
            else:
                feats = self.modules.compute_features(wavs)
        if feats is not None:
            feats = self.modules.normalize(feats, lengths)
            augment = getattr(self.hparams, "fea_augment", None)
            if stage == sb.Stage.TRAIN and augment is not None:
                feats, _ = augment(feats, lengths)
            encoded = self.modules.encoder(feats, lengths)
        logits = self.modules.ctc_lin(encoded)
        return {
            "log_probs": self.hparams.log_softmax(logits),
            "encoded": encoded,
            "lengths": lengths,
        }

    def compute_objectives(self, predictions, batch, stage):
        """CTC loss; on valid and test also decodes greedily and scores WER and CER."""
        log_probs, lengths = predictions["log_probs"], predictions["lengths"]
        tokens, token_lens = batch.tokens
        loss = sb.nnet.losses.ctc_loss(
            log_probs.float(), tokens, lengths, token_lens, self.hparams.blank_index
        )
        if stage != sb.Stage.TRAIN:
            self._score(log_probs, lengths, batch)
        return loss

    def _score(self, log_probs, lengths, batch):
        hyps = sb.decoders.ctc_greedy_decode(
            log_probs, lengths, blank_id=self.hparams.blank_index
        )
        words = [self.hparams.tokenizer.sp.decode_ids(h).split() for h in hyps]
        targets = [w.split() for w in batch.wrd]
        self.wer_metric.append(batch.id, words, targets)
        self.cer_metric.append(batch.id, ["".join(w) for w in words], ["".join(t) for t in targets])

    def on_fit_start(self):
        """Refuses MoE encoders, whose auxiliary losses and balancing phases this Brain would
        silently ignore, unless it is mixed with :class:`~sb_crossmodal_kd.moe_brain.MoEMixin`,
        which handles them."""
        if not isinstance(self, MoEMixin) and moe_layers(self.modules):
            raise ValueError(
                "The model has MoE layers: use brain_class: !name:sb_crossmodal_kd.kd_brain.KDBrain "
                "(with no heads it trains the plain CTC objective plus the MoE auxiliary losses)"
            )
        if getattr(getattr(self.hparams, "lr_annealing", None), "num_training_steps", 0) is None:
            raise ValueError(
                "lr_annealing has num_training_steps: null, to be filled from the train "
                "loader: train through sb_crossmodal_kd.experiment.run_asr_experiment (what "
                "the recipes' train.py runs), call experiment.fill_schedule_length before "
                "fit(), or set num_training_steps in the hparams"
            )
        super().on_fit_start()
        # The valid WER of every epoch so far: a resumed run takes it from the latest
        # checkpoint's meta (mid-epoch checkpoints carry none).
        self.valid_wer_curve = self.resumed_curve("valid_wer_curve")

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        """Steps the learning-rate schedule once per optimiser update."""
        if should_step:
            self.hparams.lr_annealing(self.optimizer)

    def on_stage_start(self, stage, epoch=None):
        """Fresh error-rate trackers for each evaluation pass."""
        if stage != sb.Stage.TRAIN:
            self.wer_metric = ErrorRateStats()
            self.cer_metric = ErrorRateStats(split_tokens=True)
        else:
            self._epoch_start = time.time()

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Logs, checkpoints on valid WER, and writes the test results file."""
        super().on_stage_end(stage, stage_loss, epoch)
        stage_loss = stage_loss_across_processes(stage, stage_loss, self.device)
        stats = {"loss": stage_loss}
        if stage == sb.Stage.TRAIN:
            self.train_stats = {**stats, "epoch_s": round(time.time() - self._epoch_start, 1)}
            return
        stats["WER"] = self.wer_metric.summarize("error_rate")
        stats["CER"] = self.cer_metric.summarize("error_rate")
        if stage == sb.Stage.VALID:
            lr = self.optimizer.param_groups[0]["lr"]
            log_stats(
                self.hparams,
                stats_meta={"epoch": epoch, "lr": lr},
                train_stats=self.train_stats,
                valid_stats=stats,
            )
            self.valid_wer_curve.append(round(float(stats["WER"]), 2))
            save_and_keep_best(self.checkpointer,
                               {"WER": stats["WER"], "valid_wer_curve": self.valid_wer_curve},
                               min_keys=["WER"])
        elif stage == sb.Stage.TEST:
            log_stats(
                self.hparams,
                stats_meta={"Epoch loaded": self.hparams.epoch_counter.current},
                test_stats=stats,
            )
            if sb.utils.distributed.if_main_process():
                with open(self.hparams.wer_file, "w") as handle:
                    self.wer_metric.write_stats(handle)
                atomic_write_json(self.hparams.results_file, self.test_results(stats, stage_loss))
                logger.info("valid WER by epoch: %s",
                            " ".join(f"{w:.2f}" for w in getattr(self, "valid_wer_curve", [])))
            self.test_stats = stats


    def test_results(self, stats, stage_loss):
        """What ``results_file`` keeps of the test pass (main process only); a subclass adds
        its own entries to this dict."""
        return {
            "wer": stats["WER"],
            "cer": stats["CER"],
            "test_loss": stage_loss,
            "utterances": len(self.wer_metric.scores),
            "epochs": self.hparams.epoch_counter.current,
            "params": count_parameters(self.modules),
            "valid_wer_curve": getattr(self, "valid_wer_curve", []),
        }


def count_parameters(module):
    """Number of trainable parameters of ``module``.

    Example
    -------
    >>> import torch
    >>> count_parameters(torch.nn.Linear(3, 2))
    8
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
