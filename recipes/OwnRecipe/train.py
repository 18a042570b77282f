#!/usr/bin/env python3
"""A SpeechBrain conformer CTC recipe of your own, with MoE feed-forwards and auxiliary heads.

The ``ASR`` Brain and the data preparation below are SpeechBrain's LibriSpeech conformer CTC
recipe (``recipes/LibriSpeech/ASR/CTC/train.py``), trimmed to greedy decoding. Three lines
add what sb-crossmodal-kd brings, marked ``+ kd``: the Brain mixed with ``KDMixin`` (the
heads' distillation terms and the MoE auxiliary losses join its loss) and the train split
given the units and teachers of a prep folder (``add_kd_items``)::

    python ../Manifest/manifest_prepare.py --train train.csv --valid valid.csv \\
        --test test.csv --lm_text lm.txt --output PREP
    python train.py hparams/conformer_ctc_kd.yaml --prep_folder PREP
"""

import sys

import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml

from sb_crossmodal_kd.data.audio import load_audio
from sb_crossmodal_kd.kd_brain import KDMixin
from sb_crossmodal_kd.pipeline import add_kd_items


class ASR(sb.core.Brain):
    def compute_forward(self, batch, stage):
        """Forward computations from the waveform batches to the output probabilities."""
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        feats = self.hparams.compute_features(wavs)
        feats = self.modules.normalize(feats, wav_lens)
        src = self.modules.CNN(feats)
        enc_out, _ = self.modules.Transformer(src, tgt=None, wav_len=wav_lens)
        p_ctc = self.hparams.log_softmax(self.modules.ctc_lin(enc_out))
        p_tokens = None
        if stage != sb.Stage.TRAIN:
            p_tokens = sb.decoders.ctc_greedy_decode(
                p_ctc, wav_lens, blank_id=self.hparams.blank_index
            )
        return p_ctc, wav_lens, p_tokens

    def compute_objectives(self, predictions, batch, stage):
        """Computes the loss (CTC) given predictions and targets."""
        p_ctc, wav_lens, predicted_tokens = predictions
        tokens, tokens_lens = batch.tokens
        loss = self.hparams.ctc_cost(p_ctc, tokens, wav_lens, tokens_lens)
        if stage != sb.Stage.TRAIN:
            predicted_words = [
                self.tokenizer.sp.decode_ids(ids).split(" ") for ids in predicted_tokens
            ]
            target_words = [wrd.split(" ") for wrd in batch.wrd]
            self.wer_metric.append(batch.id, predicted_words, target_words)
            self.cer_metric.append(batch.id, predicted_words, target_words)
        return loss

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        if should_step:
            self.hparams.noam_annealing(self.optimizer)

    def on_stage_start(self, stage, epoch):
        if stage != sb.Stage.TRAIN:
            self.cer_metric = self.hparams.cer_computer()
            self.wer_metric = self.hparams.error_rate_computer()

    def on_stage_end(self, stage, stage_loss, epoch):
        stage_stats = {"loss": stage_loss}
        if stage == sb.Stage.TRAIN:
            self.train_stats = stage_stats
            return
        stage_stats["CER"] = self.cer_metric.summarize("error_rate")
        stage_stats["WER"] = self.wer_metric.summarize("error_rate")
        if stage == sb.Stage.VALID:
            self.hparams.train_logger.log_stats(
                stats_meta={"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"]},
                train_stats=self.train_stats,
                valid_stats=stage_stats,
            )
            self.checkpointer.save_and_keep_only(
                meta={"WER": stage_stats["WER"], "epoch": epoch}, min_keys=["WER"]
            )
        else:
            self.hparams.train_logger.log_stats(
                stats_meta={"Epoch loaded": self.hparams.epoch_counter.current},
                test_stats=stage_stats,
            )

    def on_fit_start(self):
        super().on_fit_start()
        self.tokenizer = self.hparams.tokenizer


class KDASR(KDMixin, ASR):  # + kd: heads and MoE terms join ASR's own loss
    pass


def dataio_prepare(hparams):
    """SpeechBrain's CSV datasets giving ``sig``, ``wrd`` and ``tokens``."""
    tokenizer = hparams["tokenizer"]
    datasets = {}
    for split in ("train", "valid", "test"):
        data = sb.dataio.dataset.DynamicItemDataset.from_csv(hparams[f"{split}_csv"])
        datasets[split] = data.filtered_sorted(sort_key="duration")

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):  # read_audio, resampling audio at another rate (8 kHz, ...)
        return load_audio(wav, hparams["sample_rate"])

    @sb.utils.data_pipeline.takes("wrd")
    @sb.utils.data_pipeline.provides("wrd", "tokens")
    def text_pipeline(wrd):
        yield wrd
        yield torch.LongTensor(tokenizer.sp.encode_as_ids(wrd))

    sb.dataio.dataset.add_dynamic_item(list(datasets.values()), audio_pipeline)
    sb.dataio.dataset.add_dynamic_item(list(datasets.values()), text_pipeline)
    sb.dataio.dataset.set_output_keys(list(datasets.values()), ["id", "sig", "wrd", "tokens"])
    return datasets


if __name__ == "__main__":
    hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:])
    with open(hparams_file, encoding="utf-8") as fin:
        hparams = load_hyperpyyaml(fin, overrides)
    sb.create_experiment_directory(
        experiment_directory=hparams["output_folder"],
        hyperparams_to_save=hparams_file,
        overrides=overrides,
    )
    datasets = dataio_prepare(hparams)
    add_kd_items(datasets, hparams)  # + kd: units and teacher triples for the train split
    asr_brain = KDASR(
        modules=hparams["modules"],
        opt_class=hparams["model_opt_class"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
    )
    asr_brain.fit(
        asr_brain.hparams.epoch_counter,
        datasets["train"],
        datasets["valid"],
        train_loader_kwargs=hparams["train_dataloader_opts"],
        valid_loader_kwargs=hparams["valid_dataloader_opts"],
    )
    asr_brain.evaluate(
        datasets["test"],
        min_key="WER",
        test_loader_kwargs=hparams["test_dataloader_opts"],
    )
