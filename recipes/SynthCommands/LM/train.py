#!/usr/bin/env python3
"""Trains a causal LM over one unit type (subword, monophone or senone) on text only.

    python train.py hparams/subword.yaml   --data_folder DATA
    python train.py hparams/monophone.yaml --data_folder DATA
    python train.py hparams/senone.yaml    --data_folder DATA --tree_file TREE.json

DATA is a SynthCommands corpus (``sbkd corpus --output DATA``); its text-only corpus
``DATA/lm_text/{train,valid}.txt`` (one sentence per line) is converted to units by the yaml's
``text_units`` and the LM (SpeechBrain RNNLM or TransformerLM inside
``sb_crossmodal_kd.teachers.unit_lm.UnitLM``) is trained on it. Any other one-sentence-per-line
text works: set ``train_text`` / ``valid_text``.

Outputs in ``<output_folder>``: ``lm/`` (the teacher: ``hyperparams.yaml`` + ``lm.ckpt``,
loadable with SpeechBrain's Pretrainer, e.g. by ``sbkd teacher-cache --teacher``),
``results.json`` (held-out perplexity, EOS included, and counts), ``train_log.txt``.
"""

import json
import logging
import os
import sys

import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml

from sb_crossmodal_kd.distributed import init_distributed
from sb_crossmodal_kd.io import atomic_write_text
from sb_crossmodal_kd.teachers.unit_lm import UnitLMBrain, export_unit_lm, perplexity
from sb_crossmodal_kd.units.lexicon import OutOfVocabularyError

logger = logging.getLogger(__name__)


def convert(path, text_units):
    """Unit sequences of the lines of ``path``; OOV sentences are skipped and counted."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: make the corpus with `sbkd corpus` first")
    sequences, skipped = [], []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            text = line.strip()
            if not text:
                continue
            try:
                units = text_units(text, utterance_id=f"{os.path.basename(path)}:{number}")
            except OutOfVocabularyError as error:
                skipped.append(str(error))
                continue
            if units:
                sequences.append(units)
    if skipped:
        logger.warning("%s: skipped %d sentences with OOV words, e.g. %s", path, len(skipped),
                       skipped[0])
    return sequences, len(skipped)


def dataset(sequences):
    """A DynamicItemDataset giving each sentence's ``units`` as a LongTensor."""
    data = {f"s{i:07d}": {"sequence": s} for i, s in enumerate(sequences)}
    ds = sb.dataio.dataset.DynamicItemDataset(data)

    @sb.utils.data_pipeline.takes("sequence")
    @sb.utils.data_pipeline.provides("units")
    def units(sequence):
        return torch.tensor(sequence, dtype=torch.long)

    ds.add_dynamic_item(units)
    ds.set_output_keys(["id", "units"])
    return ds


def main(argv):
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    run_opts = init_distributed(run_opts)  # under torchrun: gloo on CPU, nccl on GPUs
    with open(hparams_file, encoding="utf-8") as fin:
        hparams = load_hyperpyyaml(fin, overrides)
    sb.create_experiment_directory(
        experiment_directory=hparams["output_folder"],
        hyperparams_to_save=hparams_file,
        overrides=overrides,
    )
    text_units = hparams["text_units"]
    train, train_skipped = convert(hparams["train_text"], text_units)
    valid, valid_skipped = convert(hparams["valid_text"], text_units)
    if hparams.get("max_train_sentences"):
        train = train[: hparams["max_train_sentences"]]
    logger.info("%d train / %d valid sentences, %d units", len(train), len(valid),
                text_units.vocab_size)

    lm_model = hparams["lm_model"](n_units=text_units.vocab_size)
    hparams["checkpointer"].add_recoverable("lm_model", lm_model)
    brain = UnitLMBrain(
        modules={"lm_model": lm_model},
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
    )
    brain.fit(
        hparams["epoch_counter"],
        dataset(train),
        dataset(valid),
        train_loader_kwargs=hparams["train_dataloader_opts"],
        valid_loader_kwargs=hparams["valid_dataloader_opts"],
    )
    brain.checkpointer.recover_if_possible(min_key="loss")
    valid_ppl = perplexity(lm_model, valid, batch_size=256, device=brain.device)
    results = {
        "unit_type": text_units.unit_type,
        "vocab_size": text_units.vocab_size,
        "units_hash": text_units.hash,
        "valid_ppl": round(valid_ppl, 4),
        "train_sentences": len(train),
        "valid_sentences": len(valid),
        "train_units": sum(len(s) for s in train),
        "skipped_oov_sentences": train_skipped + valid_skipped,
        "epochs": hparams["number_of_epochs"],
        "valid_ppl_curve": getattr(brain, "valid_ppl_curve", []),  # flat at the end: converged
    }
    if sb.utils.distributed.if_main_process():  # every rank holds the same model
        export_unit_lm(hparams["export_folder"], lm_model.cpu(), unit_type=text_units.unit_type,
                       tokenizer_hash=text_units.hash, extra={"valid_ppl": results["valid_ppl"]})
        atomic_write_text(hparams["results_file"], json.dumps(results, indent=1) + "\n")
        print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
