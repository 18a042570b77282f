"""Causal LMs over a unit vocabulary (senones, monophones, subwords), trained on text only.

The network is SpeechBrain's :class:`~speechbrain.lobes.models.RNNLM.RNNLM` (LSTM/GRU) or
:class:`~speechbrain.lobes.models.transformer.TransformerLM.TransformerLM`, wrapped by
:class:`UnitLM` so that a yaml names it with plain numbers. Token layout (fixed, so that
SpeechBrain's TransformerLM, which masks token 0 as padding, works):

* token 0: padding,
* token 1: sentence boundary (BOS on the input side, EOS on the target side),
* token ``u + 2``: unit ``u``.

Training reads ``[BOS, y_1..y_K]`` and predicts ``[y_1..y_K, EOS]``; perplexity is
``exp`` of the mean negative log-likelihood over those ``K + 1`` targets per sentence (EOS
included, as is usual for LM perplexity). As a teacher, the EOS logit is dropped and the
distribution renormalised over the units (see :mod:`sb_crossmodal_kd.teachers.base`).

A trained LM is exported as a SpeechBrain pretrained folder (``hyperparams.yaml`` +
``lm.ckpt``) by :func:`export_unit_lm` and loaded back with SpeechBrain's Pretrainer by
:func:`load_unit_lm_teacher`.

Example
-------
>>> lm = UnitLM(n_units=5, architecture="lstm", embedding_dim=8, hidden_size=8, num_layers=1)
>>> inputs, targets = lm_inputs_and_targets(torch.tensor([[3, 4, 0], [2, 0, 0]]),
...                                         torch.tensor([3, 1]))
>>> inputs
tensor([[1, 5, 6, 2],
        [1, 4, 0, 0]])
>>> targets
tensor([[5, 6, 2, 1],
        [4, 1, 0, 0]])
>>> lm(inputs).shape
torch.Size([2, 4, 7])
"""

import json
import math
import pathlib

import speechbrain as sb
import torch
from speechbrain.lobes.models.RNNLM import RNNLM

from sb_crossmodal_kd.io import atomic_path, atomic_write_text
from sb_crossmodal_kd.lengths import absolute_lengths, lengths_to_mask
from sb_crossmodal_kd.resume import ExactResume, save_and_keep_best
from sb_crossmodal_kd.stage_stats import stage_loss_across_processes

# Text -> unit ids is the unit types' business; named here too for hparams written before.
from sb_crossmodal_kd.units.types import TextUnits, units_hash  # noqa: F401

PAD_INDEX = 0
BOUNDARY_INDEX = 1
UNIT_OFFSET = 2


class UnitLM(torch.nn.Module):
    """A causal LM over ``n_units`` units plus padding and the sentence boundary.

    Arguments
    ---------
    n_units : int
        Unit vocabulary size; the network has ``n_units + 2`` output tokens.
    architecture : str
        ``"lstm"``, ``"gru"`` (SpeechBrain RNNLM) or ``"transformer"`` (TransformerLM).
    embedding_dim : int
        Token embedding size (RNN) or model width (Transformer).
    hidden_size : int
        RNN width, or the Transformer's feed-forward width.
    num_layers : int
        RNN or Transformer layers.
    dropout : float
        Dropout inside the network.
    nhead : int
        Attention heads (Transformer only).
    """

    def __init__(
        self,
        n_units,
        architecture="lstm",
        embedding_dim=128,
        hidden_size=256,
        num_layers=2,
        dropout=0.1,
        nhead=4,
    ):
        super().__init__()
        self.config = {
            "n_units": n_units,
            "architecture": architecture,
            "embedding_dim": embedding_dim,
            "hidden_size": hidden_size,
            "num_layers": num_layers,
            "dropout": dropout,
            "nhead": nhead,
        }
        n_tokens = n_units + UNIT_OFFSET
        if architecture in ("lstm", "gru"):
            rnn_class = sb.nnet.RNN.LSTM if architecture == "lstm" else sb.nnet.RNN.GRU
            self.net = RNNLM(
                output_neurons=n_tokens,
                embedding_dim=embedding_dim,
                dropout=dropout,
                rnn_class=rnn_class,
                rnn_layers=num_layers,
                rnn_neurons=hidden_size,
                dnn_blocks=1,
                dnn_neurons=embedding_dim,
            )
        elif architecture == "transformer":
            from speechbrain.lobes.models.transformer.TransformerLM import TransformerLM

            self.net = TransformerLM(
                vocab=n_tokens,
                d_model=embedding_dim,
                nhead=nhead,
                num_encoder_layers=num_layers,
                num_decoder_layers=0,
                d_ffn=hidden_size,
                dropout=dropout,
                causal=True,
            )
        else:
            raise ValueError(f"architecture must be lstm, gru or transformer, got {architecture!r}")

    def forward(self, tokens):
        """Logits ``[B, T, n_units + 2]`` for tokens ``[B, T]`` (layout in the module doc)."""
        return self.net(tokens)


def lm_inputs_and_targets(unit_ids, lengths):
    """Token inputs ``[BOS, y]`` and targets ``[y, EOS]``, both ``[B, K + 1]``, 0-padded.

    Arguments
    ---------
    unit_ids : torch.Tensor
        int64 ``[B, K]`` unit ids.
    lengths : torch.Tensor
        ``[B]`` relative or absolute lengths.
    """
    lengths = absolute_lengths(lengths, unit_ids.shape[1]).to(unit_ids.device)
    batch, max_len = unit_ids.shape
    mask = lengths_to_mask(lengths, max_len)
    tokens = torch.where(mask, unit_ids + UNIT_OFFSET, PAD_INDEX)
    pad = torch.full((batch, 1), PAD_INDEX, dtype=tokens.dtype, device=tokens.device)
    inputs = torch.cat([torch.full_like(pad, BOUNDARY_INDEX), tokens], dim=1)
    targets = torch.cat([tokens, pad], dim=1)
    targets.scatter_(1, lengths.unsqueeze(1), BOUNDARY_INDEX)
    return inputs, targets


def sentence_nll(lm_model, unit_ids, lengths):
    """Summed negative log-likelihood ``[B]`` (nats) of each sentence, EOS included."""
    inputs, targets = lm_inputs_and_targets(unit_ids, lengths)
    log_probs = torch.log_softmax(lm_model(inputs).float(), dim=-1)
    token_nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (token_nll * (targets != PAD_INDEX)).sum(-1)


def batches(sequences, batch_size):
    """Yields ``(unit_ids [B, K], lengths [B])`` padded batches from lists of unit ids."""
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        lengths = torch.tensor([len(s) for s in chunk])
        unit_ids = torch.zeros(len(chunk), max(1, int(lengths.max())), dtype=torch.long)
        for row, sequence in enumerate(chunk):
            unit_ids[row, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
        yield unit_ids, lengths


def perplexity(lm_model, sequences, batch_size=64, device="cpu"):
    """Perplexity of ``lm_model`` on ``sequences`` (lists of unit ids), EOS included.

    Example
    -------
    >>> torch.manual_seed(0) and None
    >>> lm = UnitLM(n_units=3, embedding_dim=4, hidden_size=4, num_layers=1).eval()
    >>> ppl = perplexity(lm, [[0, 1, 2], [2, 2]])
    >>> 1.0 < ppl < 10.0
    True
    """
    was_training = lm_model.training
    lm_model.eval()
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for unit_ids, lengths in batches(sequences, batch_size):
            total_nll += float(sentence_nll(lm_model, unit_ids.to(device), lengths.to(device)).sum())
            total_tokens += int(lengths.sum()) + len(lengths)
    lm_model.train(was_training)
    return math.exp(total_nll / total_tokens)


class UnitLMBrain(ExactResume, sb.Brain):
    """Trains a :class:`UnitLM` (module key ``lm_model``) on batches with a ``units`` key.

    ``batch.units`` is SpeechBrain's ``PaddedData`` of unit ids (``data, lengths``); the loss
    is the mean token negative log-likelihood, EOS included (under DDP, the train loss is the
    mean over all processes). Resumes exactly from mid-epoch checkpoints. Items of any dataset
    (e.g. ``{"id", "units"}`` dicts) are collated by SpeechBrain's ``PaddedBatch`` unless the
    loader options give another ``collate_fn``.
    """

    def make_dataloader(self, dataset, stage, ckpt_prefix="dataloader-", **loader_kwargs):
        loader_kwargs.setdefault("collate_fn", sb.dataio.batch.PaddedBatch)
        return super().make_dataloader(dataset, stage, ckpt_prefix, **loader_kwargs)

    def compute_forward(self, batch, stage):
        """Logits ``[B, K + 1, n_tokens]`` and the targets they predict."""
        batch = batch.to(self.device)
        unit_ids, lengths = batch.units
        inputs, targets = lm_inputs_and_targets(unit_ids, lengths)
        return self.modules.lm_model(inputs), targets

    def compute_objectives(self, predictions, batch, stage):
        """Mean token NLL over real targets."""
        logits, targets = predictions
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        token_nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        real = targets != PAD_INDEX
        return (token_nll * real).sum() / real.sum()

    def on_fit_start(self):
        """Recovers as usual; the held-out perplexity of every epoch so far continues from
        the latest checkpoint (``valid_ppl_curve``)."""
        super().on_fit_start()
        self.valid_ppl_curve = self.resumed_curve("valid_ppl_curve")

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Logs loss and perplexity; checkpoints on validation, keeping the best."""
        super().on_stage_end(stage, stage_loss, epoch)
        stage_loss = stage_loss_across_processes(stage, stage_loss, self.device)
        stats = {"loss": stage_loss, "ppl": math.exp(min(stage_loss, 50.0))}
        if stage == sb.Stage.TRAIN:
            self.train_stats = stats
        elif stage == sb.Stage.VALID:
            self.valid_stats = stats
            self.valid_ppl_curve.append(round(stats["ppl"], 4))
            train_logger = getattr(getattr(self, "hparams", None), "train_logger", None)
            if train_logger is not None:
                train_logger.log_stats(
                    stats_meta={"epoch": epoch},
                    train_stats=getattr(self, "train_stats", None),
                    valid_stats=stats,
                )
            if self.checkpointer is not None:
                save_and_keep_best(self.checkpointer,
                                   {"loss": stage_loss, "valid_ppl_curve": self.valid_ppl_curve},
                                   min_keys=["loss"])


def export_unit_lm(folder, lm_model, unit_type=None, tokenizer_hash=None, extra=None):
    """Writes a SpeechBrain pretrained folder: ``hyperparams.yaml`` and ``lm.ckpt``.

    The yaml rebuilds ``lm_model`` (a :class:`UnitLM`) from its config and declares a
    ``pretrainer`` loading ``lm.ckpt`` into it, plus the keys the teacher loader reads
    (``n_units``, ``bos_index``, ``unit_offset``, ``unit_type``, ``tokenizer_hash``).

    Arguments
    ---------
    folder : str or path
        Output folder (created).
    lm_model : UnitLM
        The trained LM.
    unit_type : str, optional
        Recorded in the yaml and in teacher cache headers.
    tokenizer_hash : str, optional
        Hash of what defines the unit ids (tokenizer, lexicon, tree).
    extra : dict, optional
        More scalar keys to record (e.g. ``{"valid_ppl": 12.3}``).
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "n_units": lm_model.config["n_units"],
        "unit_type": unit_type,
        "tokenizer_hash": tokenizer_hash,
        "bos_index": BOUNDARY_INDEX,
        "unit_offset": UNIT_OFFSET,
    }
    meta.update(extra or {})
    lines = ["# A unit LM exported by sb_crossmodal_kd.teachers.unit_lm.export_unit_lm"]
    lines += [f"{key}: {json.dumps(value)}" for key, value in meta.items()]
    lines.append("")
    lines.append("lm_model: !new:sb_crossmodal_kd.teachers.unit_lm.UnitLM")
    lines += [f"    {key}: {json.dumps(value)}" for key, value in lm_model.config.items()]
    lines.append("")
    lines.append("pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer")
    lines.append("    loadables:")
    lines.append("        lm: !ref <lm_model>")
    atomic_write_text(folder / "hyperparams.yaml", "\n".join(lines) + "\n")
    state = {key: value.detach().cpu() for key, value in lm_model.state_dict().items()}
    with atomic_path(folder / "lm.ckpt") as tmp:
        torch.save(state, tmp)


def load_unit_lm_teacher(folder, **kwargs):
    """The :class:`~sb_crossmodal_kd.teachers.speechbrain_lm.SpeechBrainLMTeacher` of an
    exported unit LM folder, loaded through SpeechBrain's Pretrainer."""
    from sb_crossmodal_kd.teachers.speechbrain_lm import SpeechBrainLMTeacher

    folder = pathlib.Path(folder)
    kwargs.setdefault("name", f"unit-lm:{folder.resolve()}")
    return SpeechBrainLMTeacher.from_hparams(folder, **kwargs)
