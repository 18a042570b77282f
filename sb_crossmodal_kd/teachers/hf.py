"""transformers LMs as teachers: causal (GPT-2 style) and masked (BERT style).

The units are the LM's own token ids (the subword unit of
:class:`sb_crossmodal_kd.units.subwords.PretrainedTokenizerUnits`), so a transformers teacher
and the acoustic model share one vocabulary. Both adapters load with ``from_pretrained`` from a
local folder (``local_files_only``: no network) and record the hash of the folder's tokenizer
files, computed exactly as ``PretrainedTokenizerUnits.hash`` does, so the cache can refuse
units from another tokenizer.

Special tokens (BOS/EOS, padding, ``[CLS]``/``[SEP]``/``[MASK]``, ...) are units that never
occur inside a transcript: they get probability zero and the distribution is renormalised over
the other ids (see :mod:`sb_crossmodal_kd.teachers.base`).

* :class:`HFCausalLMTeacher`: ``q_k = P(y_k | y_<k)``; the model reads
  ``[BOS, y_1..y_{K-1}]`` (BOS: ``bos_token_id`` of the config or tokenizer, e.g. GPT-2's
  ``<|endoftext|>``), right-padded with an attention mask.
* :class:`HFMaskedLMTeacher`: ``q_k = P(y_k | y_{!=k})``: ``[CLS] y_1..y_K [SEP]`` with
  position ``k`` replaced by ``[MASK]``, one masked position per sequence; all positions of a
  batch are run as one batch of ``sum(lengths)`` copies (chunked to bound memory), which is
  exactly the one-at-a-time computation, batched.
"""

import os
import pathlib

import torch

from sb_crossmodal_kd.lengths import absolute_lengths, lengths_to_mask
from sb_crossmodal_kd.teachers.base import (
    BIDIRECTIONAL,
    CAUSAL,
    Teacher,
    shift_right,
)


def _load_tokenizer(folder):
    """``PretrainedTokenizerUnits`` of ``folder`` if it holds a tokenizer, else None."""
    names = os.listdir(folder)
    if not any(n.startswith(("tokenizer", "vocab", "spm", "sentencepiece")) for n in names):
        return None
    from sb_crossmodal_kd.units.subwords import PretrainedTokenizerUnits

    return PretrainedTokenizerUnits(str(folder))


def _special_ids(config, tokenizer, *extra):
    ids = {getattr(config, key, None) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if tokenizer is not None:
        ids.update(tokenizer.tokenizer.all_special_ids)
    ids.update(extra)
    return sorted(int(i) for i in ids if i is not None)


def _first_not_none(*values):
    for value in values:
        if value is not None:
            return value
    return None



def _unit_vocab_size(model, vocab_size, name):
    """The unit vocabulary: the model's output tokens, or the first ``vocab_size`` of them."""
    n_tokens = model.get_output_embeddings().weight.shape[0]
    vocab_size = n_tokens if vocab_size is None else vocab_size
    if vocab_size > n_tokens:
        raise ValueError(f"{name}: vocab_size {vocab_size} > the model's {n_tokens} tokens")
    return vocab_size

class HFCausalLMTeacher(Teacher):
    """A transformers causal LM (``AutoModelForCausalLM``) as a causal teacher.

    Arguments
    ---------
    model : transformers.PreTrainedModel
        A causal LM; ``model(input_ids, attention_mask).logits`` is ``[B, T, n_tokens]``.
    bos_token_id : int
        Prepended to every sequence so that position 0 is predicted from a history.
    vocab_size : int, optional
        Units are tokens ``0..vocab_size-1`` (default: all of the model's output tokens).
    name, unit_type, tokenizer_hash, excluded_units
        See :class:`~sb_crossmodal_kd.teachers.base.Teacher`.

    Example
    -------
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(vocab_size=12, n_positions=16, n_embd=8, n_layer=1,
    ...                                    n_head=2, bos_token_id=11, eos_token_id=11))
    >>> teacher = HFCausalLMTeacher(model, bos_token_id=11, excluded_units=[11])
    >>> probs = teacher(torch.tensor([[3, 4, 5], [6, 0, 0]]), torch.tensor([3, 1]))
    >>> probs.shape, float(probs[:, :, 11].max())
    (torch.Size([2, 3, 12]), 0.0)
    """

    def __init__(
        self,
        model,
        bos_token_id,
        vocab_size=None,
        name="hf-causal-lm",
        unit_type="subword",
        tokenizer_hash=None,
        excluded_units=(),
    ):
        vocab_size = _unit_vocab_size(model, vocab_size, name)
        super().__init__(vocab_size, name, CAUSAL, unit_type, tokenizer_hash, excluded_units)
        if bos_token_id is None:
            raise ValueError(
                f"{name}: the causal LM needs a BOS token to predict the first unit; its config "
                "and tokenizer name none, so pass bos_token_id=..."
            )
        self.model = model
        self.bos_token_id = int(bos_token_id)
        self.model.requires_grad_(False)
        self.train(False)

    def unit_logits(self, unit_ids, lengths):
        """Logits ``[B, K, vocab_size]``; output ``k`` is the LM's prediction of unit ``k``."""
        unit_ids = unit_ids.to(self.device)
        mask = lengths_to_mask(absolute_lengths(lengths, unit_ids.shape[1]).to(self.device),
                           unit_ids.shape[1])
        inputs = shift_right(unit_ids, self.bos_token_id)
        logits = self.model(input_ids=inputs, attention_mask=mask.long()).logits
        return logits[..., : self.vocab_size]

    @classmethod
    def from_pretrained(cls, folder, **kwargs):
        """Loads model (and tokenizer, if the folder has one) from a local folder.

        ``kwargs`` override the constructor arguments (``bos_token_id``, ``vocab_size``,
        ``excluded_units``, ...); the defaults come from the config and the tokenizer, with
        all special tokens excluded and ``vocab_size = len(tokenizer)``.
        """
        from sb_crossmodal_kd.extras import require

        AutoModelForCausalLM = require("transformers").AutoModelForCausalLM

        folder = pathlib.Path(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        tokenizer = _load_tokenizer(folder)
        bos = _first_not_none(
            model.config.bos_token_id,
            tokenizer.tokenizer.bos_token_id if tokenizer is not None else None,
        )
        kwargs.setdefault("bos_token_id", bos)
        kwargs.setdefault("vocab_size", tokenizer.vocab_size if tokenizer is not None else None)
        kwargs.setdefault("excluded_units", _special_ids(model.config, tokenizer))
        kwargs.setdefault("tokenizer_hash", tokenizer.hash if tokenizer is not None else None)
        kwargs.setdefault("name", f"hf-causal-lm:{folder.resolve()}")
        return cls(model, **kwargs)


class HFMaskedLMTeacher(Teacher):
    """A transformers masked LM (``AutoModelForMaskedLM``) as a bidirectional teacher.

    Arguments
    ---------
    model : transformers.PreTrainedModel
        A masked LM; ``model(input_ids, attention_mask).logits`` is ``[B, T, n_tokens]``.
    mask_token_id : int
        Replaces the predicted position.
    cls_token_id, sep_token_id : int, optional
        Wrapped around every sequence when given (BERT: ``[CLS] ... [SEP]``).
    pad_token_id : int
        Written at padding positions (the attention mask hides them anyway).
    vocab_size : int, optional
        Units are tokens ``0..vocab_size-1`` (default: all output tokens).
    max_sequences : int
        Masked copies run per forward call; bounds memory.
    name, unit_type, tokenizer_hash, excluded_units
        See :class:`~sb_crossmodal_kd.teachers.base.Teacher`.

    Example
    -------
    >>> from transformers import BertConfig, BertForMaskedLM
    >>> model = BertForMaskedLM(BertConfig(vocab_size=12, hidden_size=8, num_hidden_layers=1,
    ...     num_attention_heads=2, intermediate_size=16, max_position_embeddings=16))
    >>> teacher = HFMaskedLMTeacher(model, mask_token_id=3, cls_token_id=1, sep_token_id=2,
    ...                             excluded_units=[0, 1, 2, 3])
    >>> probs = teacher(torch.tensor([[5, 6, 7], [8, 0, 0]]), torch.tensor([3, 1]))
    >>> probs.shape, float(probs[:, :, :4].max())
    (torch.Size([2, 3, 12]), 0.0)
    """

    def __init__(
        self,
        model,
        mask_token_id,
        cls_token_id=None,
        sep_token_id=None,
        pad_token_id=0,
        vocab_size=None,
        max_sequences=256,
        name="hf-masked-lm",
        unit_type="subword",
        tokenizer_hash=None,
        excluded_units=(),
    ):
        vocab_size = _unit_vocab_size(model, vocab_size, name)
        super().__init__(vocab_size, name, BIDIRECTIONAL, unit_type, tokenizer_hash, excluded_units)
        if mask_token_id is None:
            raise ValueError(f"{name}: no mask token; pass mask_token_id=...")
        self.model = model
        self.mask_token_id = int(mask_token_id)
        self.cls_token_id = cls_token_id
        self.sep_token_id = sep_token_id
        self.pad_token_id = int(pad_token_id if pad_token_id is not None else 0)
        self.max_sequences = int(max_sequences)
        self.model.requires_grad_(False)
        self.train(False)

    def unit_logits(self, unit_ids, lengths):
        """Logits ``[B, K, vocab_size]``; output ``k`` predicts unit ``k`` with it masked.

        Padding positions are not computed (their logits are zero).
        """
        unit_ids = unit_ids.to(self.device)
        batch, max_len = unit_ids.shape
        lengths = absolute_lengths(lengths, max_len).to(self.device)
        mask = lengths_to_mask(lengths, max_len)
        start = 1 if self.cls_token_id is not None else 0
        tokens = unit_ids.masked_fill(~mask, self.pad_token_id)
        attention = mask.long()
        if self.cls_token_id is not None:
            tokens = torch.cat([torch.full_like(tokens[:, :1], self.cls_token_id), tokens], 1)
            attention = torch.cat([torch.ones_like(attention[:, :1]), attention], 1)
        if self.sep_token_id is not None:
            tokens = torch.cat([tokens, torch.full_like(tokens[:, :1], self.pad_token_id)], 1)
            attention = torch.cat([attention, torch.zeros_like(attention[:, :1])], 1)
            sep_at = (lengths + start).unsqueeze(1)
            tokens.scatter_(1, sep_at, self.sep_token_id)
            attention.scatter_(1, sep_at, 1)

        rows, positions = mask.nonzero(as_tuple=True)  # every real position, row-major
        out = torch.zeros(batch, max_len, self.vocab_size, device=self.device)
        for chunk in range(0, len(rows), self.max_sequences):
            r = rows[chunk : chunk + self.max_sequences]
            p = positions[chunk : chunk + self.max_sequences]
            copies = tokens[r].clone()
            copies[torch.arange(len(r), device=self.device), p + start] = self.mask_token_id
            logits = self.model(input_ids=copies, attention_mask=attention[r]).logits
            picked = logits[torch.arange(len(r), device=self.device), p + start]
            out[r, p] = picked[:, : self.vocab_size].float()
        return out

    @classmethod
    def from_pretrained(cls, folder, **kwargs):
        """Loads model and tokenizer from a local folder; special ids from the tokenizer.

        ``kwargs`` override the constructor arguments; the mask, CLS, SEP and padding ids
        default to the tokenizer's (or the config's), all special tokens are excluded and
        ``vocab_size = len(tokenizer)``.
        """
        from sb_crossmodal_kd.extras import require

        AutoModelForMaskedLM = require("transformers").AutoModelForMaskedLM

        folder = pathlib.Path(folder)
        model = AutoModelForMaskedLM.from_pretrained(folder, local_files_only=True)
        tokenizer = _load_tokenizer(folder)
        tok = tokenizer.tokenizer if tokenizer is not None else None
        for key in ("mask_token_id", "cls_token_id", "sep_token_id", "pad_token_id"):
            value = _first_not_none(
                getattr(tok, key, None) if tok is not None else None,
                getattr(model.config, key, None),
            )
            kwargs.setdefault(key, value)
        kwargs.setdefault("vocab_size", tokenizer.vocab_size if tokenizer is not None else None)
        kwargs.setdefault(
            "excluded_units", _special_ids(model.config, tokenizer, kwargs["mask_token_id"])
        )
        kwargs.setdefault("tokenizer_hash", tokenizer.hash if tokenizer is not None else None)
        kwargs.setdefault("name", f"hf-masked-lm:{folder.resolve()}")
        return cls(model, **kwargs)
