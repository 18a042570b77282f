#!/usr/bin/env python3
"""Frame-level monophone classification: Deep MoE vs dense MLP vs single-layer MoE.

The speech experiment of Eigen, Ranzato and Sutskever (2013) on the embedded SynthCommands
corpus: each 10 ms Fbank frame, with +-5 frames of context, is classified into one of 40
phones (39 ARPAbet + sil); a frame takes the phone covering its centre. Frame labels come
from forced alignments (``sbkd align``, the default) or from the corpus's own synthesiser
timings (``--alignments_folder null --alignments_suffix _alignments.json``; null means the
folder of the manifests).

    sbkd corpus --output DATA
    sbkd align --train DATA/train.csv --train-utterances 400 \
        --manifests DATA/train.csv DATA/valid.csv DATA/test.csv --output DATA/align
    python train.py hparams/dmoe.yaml --data_folder DATA
    python train.py hparams/dense_mlp.yaml --data_folder DATA
    python train.py hparams/moe_single.yaml --data_folder DATA

Frame accuracy and the expert-usage summary go to <output_folder>/results.json, the heat
maps (joint usage of the two layers' experts, usage by phone) to <output_folder>/expert_usage/.
"""

import logging
import sys
from pathlib import Path

import speechbrain as sb

from sb_crossmodal_kd.alignment.corpus import load_phone_segments
from sb_crossmodal_kd.alignment.framerate import FrameRate
from sb_crossmodal_kd.data.audio import load_audio
from sb_crossmodal_kd.data.manifest import check_manifest
from sb_crossmodal_kd.distributed import finish_process, init_distributed
from sb_crossmodal_kd.experiment import start_experiment, train_loader_options
from sb_crossmodal_kd.frame_brain import FrameBrain, phone_frame_labels
from sb_crossmodal_kd.units.phones import PHONES

logger = logging.getLogger(__name__)


def dataio_prepare(hparams):
    """``{"train", "valid", "test"}`` datasets giving ``sig`` and ``frame_labels``."""
    rate = FrameRate(sample_rate=hparams["sample_rate"])
    tolerance = hparams["alignment_tolerance"]
    datasets = {}
    for split in ("train", "valid", "test"):
        csv_path = Path(hparams[f"{split}_csv"])
        check_manifest(csv_path, sample_rate=hparams["sample_rate"])
        folder = hparams.get("alignments_folder") or csv_path.parent  # null: the data folder
        align_path = Path(folder) / f"{split}{hparams['alignments_suffix']}"
        phones, skipped = load_phone_segments(align_path)
        data = sb.dataio.dataio.load_data_csv(str(csv_path))
        missing = [utt for utt in data if utt not in phones and utt not in skipped]
        if missing:
            raise ValueError(
                f"{csv_path}: {len(missing)} utterances have no alignment in {align_path}, "
                f"e.g. {missing[:3]}; align this manifest (sbkd align --manifests {csv_path})"
            )
        if skipped:  # the aligner left these out (OOV words, ...): they have no labels
            logger.warning("%s: %d utterances the aligner skipped are left out, e.g. %s: %s",
                           split, len(skipped), *next(iter(skipped.items())))
        data = {utt: row for utt, row in data.items() if utt in phones}
        dataset = sb.dataio.dataset.DynamicItemDataset(data)

        @sb.utils.data_pipeline.takes("wav")
        @sb.utils.data_pipeline.provides("sig")
        def audio_pipeline(wav):
            return load_audio(wav, hparams["sample_rate"])

        @sb.utils.data_pipeline.takes("id", "sig")
        @sb.utils.data_pipeline.provides("frame_labels")
        def label_pipeline(utt, sig, phones=phones):
            return phone_frame_labels(phones[utt], len(sig), rate, utt, tolerance)

        dataset = dataset.filtered_sorted(sort_key="duration")
        dataset.add_dynamic_item(audio_pipeline)
        dataset.add_dynamic_item(label_pipeline)
        dataset.set_output_keys(["id", "sig", "frame_labels"])
        datasets[split] = dataset
    return datasets


def run(hparams_file, overrides=None, run_opts=None):
    """Trains, tests and returns the results dict of one hparams file."""
    # start_experiment also takes a file that wraps these hparams in `experiment: !include:...`
    # with other settings (another corpus's recipe, e.g. recipes/TIMIT/frame_classification).
    hparams = start_experiment(hparams_file, overrides)
    datasets = dataio_prepare(hparams)
    hparams.setdefault("class_names", list(PHONES))
    brain = FrameBrain(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts=run_opts or {},
        checkpointer=hparams["checkpointer"],
    )
    brain.fit(
        brain.hparams.epoch_counter,
        datasets["train"],
        datasets["valid"],
        # The same global order under torchrun as in one process (see train_loader_options)
        train_loader_kwargs=train_loader_options(hparams, datasets["train"]),
        valid_loader_kwargs=hparams["valid_dataloader_opts"],
    )
    brain.evaluate(datasets["test"], max_key="frame_acc",
                   test_loader_kwargs=hparams["test_dataloader_opts"])
    return brain.test_results


def main(argv=None):
    """``train.py hparams.yaml [--overrides...]``, as SpeechBrain recipes parse it."""
    hparams_file, run_opts, overrides = sb.parse_arguments(argv or sys.argv[1:])
    run_opts = init_distributed(run_opts)  # under torchrun: gloo on CPU, nccl on GPUs
    results = run(hparams_file, overrides, run_opts)
    logger.info("Test frame accuracy %.4f", results["frame_accuracy"])
    return results


if __name__ == "__main__":
    main()
    finish_process()  # under torchrun: exit without gloo's teardown
