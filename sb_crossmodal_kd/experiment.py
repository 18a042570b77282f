"""Runs a CTC experiment from a hyperpyyaml file: data, tokenizer, training, test.

Recipes' ``train.py`` and ``sbkd demo`` both call :func:`run_asr_experiment`, so a recipe is
its hparams file and the command line, as in SpeechBrain. The hparams file must define
``train_csv``, ``valid_csv``, ``test_csv``, ``output_folder``, ``save_folder``,
``tokenizer`` (SpeechBrain's SentencePiece wrapper, trained on ``train_csv``), ``modules``,
``opt_class``, ``checkpointer``, ``epoch_counter``, ``brain_class`` and the loader options.
"""

import logging
import math
import os
import sys
from pathlib import Path

import ruamel.yaml
import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml

from sb_crossmodal_kd.data.audio import load_audio
from sb_crossmodal_kd.data.manifest import check_manifest
from sb_crossmodal_kd.distributed import init_distributed
from sb_crossmodal_kd.revision import create_experiment_folder

logger = logging.getLogger(__name__)


def asr_datasets(hparams):
    """Checks the manifests and returns ``{"train", "valid", "test"}`` DynamicItemDatasets.

    Each item provides ``id``, ``wrd``, ``sig`` (the waveform, mono at ``sample_rate``: audio
    at another rate is resampled on load) and ``tokens`` (subword ids);
    with ``hparams["cache_features"]`` it provides ``feats`` instead of ``sig``: the
    ``compute_features`` module's output, computed once per utterance and kept in memory
    (:class:`~sb_crossmodal_kd.data.features.FeatureCache`), which the Brain uses as it
    would the features of ``sig``.
    """
    sample_rate = hparams["sample_rate"]
    for split in ("train", "valid", "test"):
        check_manifest(hparams[f"{split}_csv"], sample_rate=sample_rate)
    # The tokenizer trains on the train manifest, so it is built only once that is checked.
    # Under DDP the main process trains it first; every process then loads the saved model.
    build_tokenizer = hparams["tokenizer"]
    if not hasattr(build_tokenizer, "sp"):
        sb.utils.distributed.run_on_main(build_tokenizer)
        hparams["tokenizer"] = build_tokenizer()
    tokenizer = hparams["tokenizer"]

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        return load_audio(wav, sample_rate)

    @sb.utils.data_pipeline.takes("wrd")
    @sb.utils.data_pipeline.provides("wrd", "tokens")
    def text_pipeline(wrd):
        yield wrd
        yield sb.dataio.encoder.torch.LongTensor(tokenizer.sp.encode_as_ids(wrd))

    cache = None
    if hparams.get("cache_features", False):
        from sb_crossmodal_kd.data.features import FeatureCache
        from sb_crossmodal_kd.distributed import unwrap

        if getattr(unwrap(hparams["modules"]["encoder"]), "takes_waveforms", False):
            raise ValueError(
                "cache_features caches filterbanks, but this encoder reads the waveform "
                "itself: set cache_features: False"
            )
        cache = FeatureCache(hparams["compute_features"], sample_rate)
    datasets = {}
    for split in ("train", "valid", "test"):
        dataset = sb.dataio.dataset.DynamicItemDataset.from_csv(hparams[f"{split}_csv"])
        dataset = dataset.filtered_sorted(sort_key="duration")
        dataset.add_dynamic_item(audio_pipeline if cache is None else cache.dynamic_item())
        dataset.add_dynamic_item(text_pipeline)
        dataset.set_output_keys(["id", "sig" if cache is None else "feats", "wrd", "tokens"])
        datasets[split] = dataset
    if hparams.get("dataset_pipelines") is not None:  # e.g. the KD recipe's units and teachers
        hparams["dataset_pipelines"](datasets, hparams)
    return datasets


def train_loader_options(hparams, train_data):
    """Loader options; with ``dynamic_batching``, SpeechBrain's ``DynamicBatchSampler``
    groups utterances of similar duration (``dynamic_batch_sampler`` options), which wastes
    far less compute on padding than random fixed-size batches.

    Without it, the order is an explicit sampler: ``shuffle`` gives a
    ``ReproducibleRandomSampler`` seeded with ``hparams["seed"]`` and the epoch, else the
    dataset's order. Under DDP SpeechBrain deals that one order out to the processes
    (rank r takes items r, r + N, ...), so N processes with batch B see the batches of one
    process with batch N x B; left to itself it would shuffle with its own seed under DDP,
    and ignore ``shuffle: False`` unless hparams set ``sorting``.

    Example
    -------
    >>> data = list(range(6))
    >>> options = train_loader_options({"train_dataloader_opts": {"batch_size": 2,
    ...                                  "shuffle": True}, "seed": 3}, data)
    >>> sorted(options), sorted(options["sampler"])
    (['batch_size', 'sampler'], [0, 1, 2, 3, 4, 5])
    """
    options = dict(hparams["train_dataloader_opts"])
    if not hparams.get("dynamic_batching", False):
        if options.get("sampler") is None and options.get("batch_sampler") is None:
            if options.pop("shuffle", False):
                seed = hparams.get("seed", 563375142)
                options["sampler"] = sb.dataio.sampler.ReproducibleRandomSampler(
                    train_data, seed=seed
                )
            else:
                options["sampler"] = torch.utils.data.SequentialSampler(train_data)
        return options
    sampler = sb.dataio.sampler.DynamicBatchSampler(
        train_data,
        length_func=lambda item: float(item["duration"]),
        **hparams["dynamic_batch_sampler"],
    )
    options = {k: v for k, v in options.items() if k not in ("batch_size", "shuffle")}
    return {**options, "batch_sampler": sampler}


def fill_schedule_length(scheduler, loader_options, train_data, epochs):
    """Gives a schedule that anneals over the whole training its length in optimiser steps.

    SpeechBrain's ``LinearWarmupScheduler`` decays the learning rate linearly to zero at
    ``num_training_steps``; with dynamic batching the number of batches per epoch is known
    only once the sampler exists, so a recipe leaves it ``null`` and it is set here to
    ``epochs x batches per epoch`` (per process under DDP). Other schedulers are left alone.

    Example
    -------
    >>> from speechbrain.nnet.schedulers import LinearWarmupScheduler
    >>> scheduler = LinearWarmupScheduler(0.01, 10, None)
    >>> fill_schedule_length(scheduler, {"batch_size": 4}, list(range(10)), epochs=5)
    >>> scheduler.num_training_steps
    15
    """
    if getattr(scheduler, "num_training_steps", 0) is not None:
        return
    sampler = loader_options.get("batch_sampler")
    if sampler is not None:
        batches = len(sampler)
    else:
        batches = math.ceil(len(train_data) / loader_options.get("batch_size", 1))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    scheduler.num_training_steps = max(1, math.ceil(batches / world)) * int(epochs)


WRAPPER_KEY = "experiment"


def enabled(value, enabled=True):
    """``value`` if ``enabled``, else None: an hparams switch for an optional object.

    Example
    -------
    >>> enabled("SpecAugment", True), enabled("SpecAugment", False)
    ('SpecAugment', None)
    """
    return value if enabled else None


def file_overrides(hparams_file, overrides=None):
    """``overrides`` (a dict or a yaml string) in the structure of ``hparams_file``.

    hyperpyyaml has no top-level include, so a variant of an experiment can be a file whose
    key is ``experiment: !include:base.yaml`` with the variant's settings under it (see
    ``recipes/SynthCommands/KD``). Flat overrides of such a file apply inside that include,
    except those naming another top-level key of the file: a wrapping file may hold settings
    that its include refers to (values under the include are resolved in the wrapping file,
    e.g. ``prep_folder: !PLACEHOLDER`` beside ``experiment: !include:...`` with
    ``data_folder: !ref <prep_folder>/data`` under it, as ``recipes/LibriSpeech``).
    """
    if isinstance(overrides, str):
        overrides = ruamel.yaml.YAML().load(overrides)
    overrides = dict(overrides or {})
    with open(hparams_file) as handle:
        keys = list(ruamel.yaml.YAML().load(handle) or {})
    if WRAPPER_KEY not in keys or not overrides or WRAPPER_KEY in overrides:
        return overrides
    outer = {key: value for key, value in overrides.items() if key in keys}
    inner = {key: value for key, value in overrides.items() if key not in keys}
    return {**outer, WRAPPER_KEY: inner} if inner else outer


def load_hparams(hparams_file, overrides=None):
    """Loads a hyperpyyaml file with ``overrides`` (a dict or a yaml string); a file wrapping
    a shared base in ``experiment:`` (see :func:`file_overrides`) is unwrapped."""
    overrides = file_overrides(hparams_file, overrides)
    with open(hparams_file) as handle:
        hparams = load_hyperpyyaml(handle, overrides)
    if isinstance(hparams.get(WRAPPER_KEY), dict):
        return hparams[WRAPPER_KEY]
    return hparams


def start_experiment(hparams_file, overrides=None):
    """Loads ``hparams_file`` with ``overrides`` (:func:`load_hparams`) and creates its
    ``output_folder`` as SpeechBrain recipes do (the hparams copy, the log, ``env.log``);
    returns the hparams."""
    hparams = load_hparams(hparams_file, overrides)
    create_experiment_folder(hparams["output_folder"], hparams_file,
                             file_overrides(hparams_file, overrides))
    return hparams


def run_asr_experiment(hparams_file, overrides=None, run_opts=None):
    """Trains and tests the model of ``hparams_file``; returns the results dict.

    Arguments
    ---------
    hparams_file : str or Path
        A recipe's hparams file.
    overrides : dict, optional
        Values replacing those of the file (as on a recipe's command line).
    run_opts : dict, optional
        SpeechBrain run options (``device``, ``precision``, ``distributed_launch``, ...).
    """
    import json

    hparams = start_experiment(hparams_file, overrides)
    datasets = asr_datasets(hparams)
    brain = hparams["brain_class"](
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts=run_opts or {},
        checkpointer=hparams["checkpointer"],
    )
    loader_options = train_loader_options(hparams, datasets["train"])
    fill_schedule_length(hparams["lr_annealing"], loader_options, datasets["train"],
                         hparams["number_of_epochs"])
    brain.fit(
        brain.hparams.epoch_counter,
        datasets["train"],
        datasets["valid"],
        train_loader_kwargs=loader_options,
        valid_loader_kwargs=hparams["valid_dataloader_opts"],
    )
    brain.evaluate(
        datasets["test"], min_key="WER", test_loader_kwargs=hparams["test_dataloader_opts"]
    )
    sb.utils.distributed.ddp_barrier()  # under DDP the main process writes the results
    return json.loads(Path(hparams["results_file"]).read_text())


def main(argv=None):
    """``train.py hparams.yaml [--overrides...]``, as SpeechBrain recipes parse it."""
    hparams_file, run_opts, overrides = sb.parse_arguments(argv or sys.argv[1:])
    run_opts = init_distributed(run_opts)  # under torchrun: gloo on CPU, nccl on GPUs
    results = run_asr_experiment(hparams_file, overrides, run_opts)
    logger.info("Test WER %.2f%%, CER %.2f%%", results["wer"], results["cer"])
    return results
