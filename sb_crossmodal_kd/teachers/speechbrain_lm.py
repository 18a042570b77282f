"""A SpeechBrain causal LM (RNNLM, TransformerLM, ...) as a teacher, loaded by its hparams.

A SpeechBrain pretrained-model folder holds a ``hyperparams.yaml`` that builds the LM (a key
such as ``lm_model``) and a ``pretrainer`` (:class:`speechbrain.utils.parameter_transfer.
Pretrainer`) whose loadables name the checkpoint files (``lm.ckpt``, ``tokenizer.ckpt``), as in
SpeechBrain's LibriSpeech ASR models. :meth:`SpeechBrainLMTeacher.from_hparams` builds the yaml,
collects the files from the local folder through the Pretrainer and loads them; no network.

Token ids and units: the LM's token ``unit + unit_offset`` is unit ``unit``. SpeechBrain's
subword LMs use their tokenizer's ids directly (``unit_offset: 0``); this package's unit LMs
keep 0 for padding and 1 for the sentence boundary (``unit_offset: 2``,
:mod:`sb_crossmodal_kd.teachers.unit_lm`). Optional yaml keys read by the loader:
``bos_index``, ``unit_offset``, ``n_units``, ``unit_type``, ``tokenizer_hash``,
``excluded_units``. ``tokenizer_hash`` is what the unit ids were defined with, compared with
the units' own hash when a cache is built; the SHA-256 of a collected ``tokenizer`` file is
recorded separately (``describe()["tokenizer_file_sha256"]``), so a cache header still names
the LM's tokenizer.

Example
-------
>>> from speechbrain.lobes.models.RNNLM import RNNLM
>>> lm = RNNLM(output_neurons=7, embedding_dim=8, rnn_neurons=8, rnn_layers=1, dnn_neurons=8)
>>> teacher = SpeechBrainLMTeacher(lm, vocab_size=5, bos_index=1, unit_offset=2)
>>> probs = teacher(torch.tensor([[0, 4, 2]]), torch.tensor([1.0]))
>>> probs.shape, bool(torch.allclose(probs.sum(-1), torch.ones(1, 3)))
(torch.Size([1, 3, 5]), True)
"""

import hashlib
import pathlib

import torch

from sb_crossmodal_kd.lengths import absolute_lengths, lengths_to_mask
from sb_crossmodal_kd.teachers.base import (
    CAUSAL,
    Teacher,
    shift_right,
)


def file_sha256(path):
    """Hex SHA-256 of a file's bytes (chunked, so large checkpoints are fine)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def output_size(model):
    """Number of output logits of a SpeechBrain LM (its last ``Linear``)."""
    last = None
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            last = module
    if last is None:
        raise ValueError(f"cannot find the output layer of {type(model).__name__}")
    return last.out_features


class SpeechBrainLMTeacher(Teacher):
    """Causal teacher over a SpeechBrain LM module that maps tokens ``[B, T]`` to logits.

    Arguments
    ---------
    lm_model : torch.nn.Module
        E.g. :class:`speechbrain.lobes.models.RNNLM.RNNLM` or
        :class:`speechbrain.lobes.models.transformer.TransformerLM.TransformerLM`; returns
        logits ``[B, T, n_tokens]`` (or a tuple whose first item they are).
    vocab_size : int
        Number of units; the unit logits are tokens ``unit_offset .. unit_offset+vocab_size-1``.
    bos_index : int
        The LM's beginning-of-sentence token, prepended to every sequence.
    unit_offset : int
        Token id of unit 0.
    pad_index : int
        Token written at padding positions (SpeechBrain's TransformerLM masks token 0 as
        padding).
    name, unit_type, tokenizer_hash, excluded_units
        See :class:`~sb_crossmodal_kd.teachers.base.Teacher`.
    """

    def __init__(
        self,
        lm_model,
        vocab_size,
        bos_index,
        unit_offset=0,
        pad_index=0,
        name="speechbrain-lm",
        unit_type=None,
        tokenizer_hash=None,
        excluded_units=(),
    ):
        super().__init__(
            vocab_size,
            name=name,
            context=CAUSAL,
            unit_type=unit_type,
            tokenizer_hash=tokenizer_hash,
            excluded_units=excluded_units,
        )
        n_tokens = output_size(lm_model)
        if unit_offset + vocab_size > n_tokens:
            raise ValueError(
                f"{name}: units {unit_offset}..{unit_offset + vocab_size - 1} do not fit the "
                f"LM's {n_tokens} output tokens; check n_units / unit_offset"
            )
        self.lm_model = lm_model
        self.bos_index = int(bos_index)
        self.unit_offset = int(unit_offset)
        self.pad_index = int(pad_index)
        for parameter in self.lm_model.parameters():
            parameter.requires_grad_(False)
        self.train(False)

    def unit_logits(self, unit_ids, lengths):
        """Logits ``[B, K, vocab_size]``; output ``k`` is the LM's prediction of unit ``k``."""
        unit_ids = unit_ids.to(self.device)
        lengths = absolute_lengths(lengths, unit_ids.shape[1]).to(self.device)
        tokens = shift_right(unit_ids + self.unit_offset, self.bos_index)
        # Padding after each sequence (never seen by a real position: the LM is causal).
        tokens = tokens.masked_fill(~lengths_to_mask(lengths, tokens.shape[1]), self.pad_index)
        logits = self.lm_model(tokens)
        if isinstance(logits, tuple):
            logits = logits[0]
        return logits[..., self.unit_offset : self.unit_offset + self.vocab_size]

    @classmethod
    def from_hparams(
        cls,
        source,
        hparams_file="hyperparams.yaml",
        model_key="lm_model",
        overrides=None,
        **kwargs,
    ):
        """Builds the LM from ``source/hparams_file`` and loads it with its Pretrainer.

        Arguments
        ---------
        source : str or path
            Local folder with the yaml and the checkpoint files the Pretrainer names.
        hparams_file : str
            Yaml file name inside ``source``.
        model_key : str
            Yaml key of the LM module.
        overrides : dict, optional
            Hyperpyyaml overrides.
        **kwargs
            Constructor arguments that take precedence over the yaml keys listed in the
            module docstring (``vocab_size``, ``bos_index``, ``unit_offset``, ...).
        """
        from hyperpyyaml import load_hyperpyyaml
        from speechbrain.utils.fetching import LocalStrategy

        source = pathlib.Path(source)
        yaml_path = source / hparams_file
        if not yaml_path.is_file():
            raise FileNotFoundError(f"no {hparams_file} in {source}: not a SpeechBrain LM folder")
        with open(yaml_path, encoding="utf-8") as handle:
            hparams = load_hyperpyyaml(handle, overrides or {})
        for key in (model_key, "pretrainer"):
            if key not in hparams:
                raise KeyError(f"{yaml_path} has no {key!r} key (keys: {sorted(hparams)})")
        pretrainer = hparams["pretrainer"]
        paths = pretrainer.collect_files(
            default_source=str(source), local_strategy=LocalStrategy.NO_LINK
        )
        pretrainer.load_collected()
        model = hparams[model_key]

        unit_offset = kwargs.pop("unit_offset", hparams.get("unit_offset", 0))
        if "bos_index" not in kwargs and "bos_index" not in hparams:
            raise KeyError(f"{yaml_path} has no bos_index; pass bos_index=... explicitly")
        bos_index = kwargs.pop("bos_index", hparams.get("bos_index"))
        vocab_size = kwargs.pop(
            "vocab_size", hparams.get("n_units", output_size(model) - unit_offset)
        )
        teacher = cls(
            model,
            vocab_size=vocab_size,
            bos_index=bos_index,
            unit_offset=unit_offset,
            name=kwargs.pop("name", f"speechbrain-lm:{source.resolve()}"),
            unit_type=kwargs.pop("unit_type", hparams.get("unit_type")),
            tokenizer_hash=kwargs.pop("tokenizer_hash", hparams.get("tokenizer_hash")),
            excluded_units=kwargs.pop("excluded_units", hparams.get("excluded_units", ())),
            **kwargs,
        )
        if "tokenizer" in paths:
            teacher.tokenizer_file_sha256 = file_sha256(paths["tokenizer"])
        return teacher

    def describe(self):
        """The base description plus the SHA-256 of the LM's own tokenizer file, if any."""
        description = super().describe()
        if getattr(self, "tokenizer_file_sha256", None):
            description["tokenizer_file_sha256"] = self.tokenizer_file_sha256
        return description
