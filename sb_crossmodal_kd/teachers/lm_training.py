"""Trains a causal LM over one unit type (subword, monophone or senone) on text only.

:func:`train_unit_lm` runs one hparams file of :data:`~sb_crossmodal_kd.hparams.UNIT_LMS`
(what the data chain trains its teachers with, and what ``recipes/SynthCommands/LM/train.py``
runs from the command line). The text (``train_text`` / ``valid_text``, one sentence per line)
is converted to units by the yaml's ``text_units``, and the LM (SpeechBrain RNNLM or
TransformerLM inside :class:`~sb_crossmodal_kd.teachers.unit_lm.UnitLM`) is trained on it.

Outputs in ``<output_folder>``: ``lm/`` (the teacher: ``hyperparams.yaml`` + ``lm.ckpt``,
loadable with SpeechBrain's Pretrainer, e.g. by ``sbkd teacher-cache --teacher``),
``results.json`` (held-out perplexity by epoch and at the end, EOS included, and counts),
``train_log.txt``, and ``text_units/{train,valid}/``: the text as unit ids, converted shard by
shard (:mod:`~sb_crossmodal_kd.teachers.text_shards`, ``conversion_jobs`` processes), which a
re-run reuses, and from which training reads each sentence as it needs it (memory-mapped:
the memory held does not grow with the text, beyond 4 bytes a sentence for the length
buckets and SpeechBrain's sampler's own bookkeeping).
"""

import json
import logging
import os

import numpy as np
import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml

from sb_crossmodal_kd.distributed import init_distributed
from sb_crossmodal_kd.io import atomic_write_text
from sb_crossmodal_kd.revision import create_experiment_folder
from sb_crossmodal_kd.teachers.text_shards import (
    SHARD_SIZE,
    TextShards,
    convert_lines,
    convert_to_shards,
)
from sb_crossmodal_kd.teachers.unit_lm import UnitLMBrain, export_unit_lm, perplexity

__all__ = ["UnitSentences", "convert", "dataset", "length_buckets", "main", "sentence_lengths",
           "train_unit_lm"]

logger = logging.getLogger(__name__)


def convert(path, text_units):
    """Unit sequences of the lines of ``path``; OOV sentences are skipped and counted.

    The one-process, in-memory conversion (nothing written);
    :func:`~sb_crossmodal_kd.teachers.text_shards.convert_sharded` gives the same sequences
    and count, shard by shard on disk, over processes or ranks.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: make the corpus with `sbkd corpus` first")
    sequences, skipped, first_skipped = convert_lines(path, text_units)
    if skipped:
        logger.warning("%s: skipped %d sentences with OOV words, e.g. %s", path, skipped,
                       first_skipped)
    return sequences, skipped


class UnitSentences(torch.utils.data.Dataset):
    """Sentences of unit ids as batch items ``{"id": "s0000012", "units": LongTensor}``, each
    read from ``sequences`` when asked for (a list, or the memory-mapped
    :class:`~sb_crossmodal_kd.teachers.text_shards.TextShards` of a large text).

    Example
    -------
    >>> item = UnitSentences([[4, 2], [7]])[1]
    >>> item["id"], item["units"]
    ('s0000001', tensor([7]))
    """

    def __init__(self, sequences):
        self.sequences = sequences

    def __len__(self):
        return len(self.sequences)

    def __getitem__(self, index):
        return {"id": f"s{index:07d}",
                "units": torch.tensor(self.sequences[index], dtype=torch.long)}


def dataset(sequences):
    """The sentences as a dataset :class:`~sb_crossmodal_kd.teachers.unit_lm.UnitLMBrain`
    trains on (:class:`UnitSentences`)."""
    return UnitSentences(sequences)


def sentence_lengths(sequences):
    """Units in each sentence (int array): read from the shards' offsets for a
    :class:`~sb_crossmodal_kd.teachers.text_shards.TextShards`, no sentence loaded."""
    if isinstance(sequences, TextShards):
        return sequences.lengths()
    return np.array([len(s) for s in sequences], dtype=np.int32)


def length_buckets(train_set, sequences, loader_kwargs, seed):
    """Loader options whose batches hold sentences of similar length (SpeechBrain's
    ``DynamicBatchSampler``, reshuffled every epoch).

    A batch holds up to ``batch_size`` x the mean sentence length in units (EOS included), so
    an epoch has about as many updates as random batches of ``batch_size`` sentences, with
    little padding: an LSTM's time per batch goes with its longest sentence.

    Example
    -------
    >>> sequences = [[1] * n for n in (2, 9, 3, 8, 2, 9, 3, 8)]
    >>> options = length_buckets(dataset(sequences), sequences, {"batch_size": 2}, seed=1)
    >>> sorted(sorted(len(sequences[i]) for i in batch) for batch in options["batch_sampler"])
    [[2, 2], [3, 3], [8], [8], [9], [9]]
    """
    from speechbrain.dataio.sampler import DynamicBatchSampler

    options = {k: v for k, v in loader_kwargs.items() if k not in ("batch_size", "shuffle")}
    lengths = (sentence_lengths(sequences) + 1).tolist()
    max_units = max(max(lengths), round(loader_kwargs.get("batch_size", 1) * sum(lengths)
                                        / len(lengths)))
    options["batch_sampler"] = DynamicBatchSampler(
        train_set, max_batch_length=max_units, num_buckets=min(8, len(lengths)),
        lengths_list=lengths, shuffle=True, batch_ordering="random", seed=seed)
    return options


def train_unit_lm(hparams_file, overrides=None, run_opts=None, conversion_jobs=None):
    """Trains and exports the unit LM of ``hparams_file`` (e.g. :data:`UNIT_LMS` ``/
    "senone.yaml"``) with ``overrides``; returns the content of its ``results.json``.

    Arguments
    ---------
    hparams_file : str or Path
        A unit-LM hparams file.
    overrides : dict or str, optional
        Values replacing the file's (``data_folder``, ``output_folder``, ``tree_file``, ...).
    run_opts : dict, optional
        SpeechBrain run options (``device``, ...).
    conversion_jobs : int, optional
        Processes converting the text to units (default: the hparams' ``conversion_jobs``,
        else 1). The text is converted shard by shard
        (:func:`~sb_crossmodal_kd.teachers.text_shards.convert_to_shards`, ``text_shard_size``
        lines a shard) into ``<output_folder>/text_units/{train,valid}/``, where a re-run
        finds it; the sequences do not depend on the number of processes.
    """
    hparams_file = str(hparams_file)
    with open(hparams_file, encoding="utf-8") as fin:
        hparams = load_hyperpyyaml(fin, overrides)
    create_experiment_folder(hparams["output_folder"], hparams_file, overrides)
    text_units = hparams["text_units"]
    if conversion_jobs is None:
        conversion_jobs = hparams.get("conversion_jobs", 1)
    shards = os.path.join(hparams["output_folder"], "text_units")
    shard_size = hparams.get("text_shard_size", SHARD_SIZE)
    # Memory-mapped from the shards: the text's units are never all in memory.
    train, train_skipped = convert_to_shards(hparams["train_text"], text_units,
                                             os.path.join(shards, "train"), conversion_jobs,
                                             shard_size)
    valid, valid_skipped = convert_to_shards(hparams["valid_text"], text_units,
                                             os.path.join(shards, "valid"), conversion_jobs,
                                             shard_size)
    if hparams.get("max_train_sentences"):
        train = train.first(hparams["max_train_sentences"])
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
    train_set = dataset(train)
    train_loader_kwargs = dict(hparams["train_dataloader_opts"])
    if hparams.get("bucket_by_length", False):
        train_loader_kwargs = length_buckets(train_set, train, train_loader_kwargs,
                                             hparams.get("seed", 1986))
    brain.fit(
        hparams["epoch_counter"],
        train_set,
        dataset(valid),
        train_loader_kwargs=train_loader_kwargs,
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
        "train_units": int(sentence_lengths(train).sum()),
        "skipped_oov_sentences": train_skipped + valid_skipped,
        "epochs": hparams["number_of_epochs"],
        "valid_ppl_curve": getattr(brain, "valid_ppl_curve", []),  # flat at the end: converged
    }
    if sb.utils.distributed.if_main_process():  # every rank holds the same model
        export_unit_lm(hparams["export_folder"], lm_model.cpu(), unit_type=text_units.unit_type,
                       tokenizer_hash=text_units.hash, extra={"valid_ppl": results["valid_ppl"]})
        atomic_write_text(hparams["results_file"], json.dumps(results, indent=1) + "\n")
    return results


def main(argv):
    """The LM recipe's command line: ``HPARAMS_FILE [--option value ...]`` (SpeechBrain's)."""
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    run_opts = init_distributed(run_opts)  # under torchrun: gloo on CPU, nccl on GPUs
    results = train_unit_lm(hparams_file, overrides, run_opts)
    if sb.utils.distributed.if_main_process():
        print(json.dumps(results))

