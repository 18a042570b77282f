"""The distillation Brain: the CTC acoustic model plus heads, distillation and MoE losses.

:class:`KDMixin` adds the heads, their distillation terms and, through
:class:`~sb_crossmodal_kd.moe_brain.MoEMixin`, everything MoE layers need to any
SpeechBrain Brain (``class MyASR(KDMixin, ASR)``: a recipe's own Brain, unchanged).
:class:`KDBrain` is that mixin on :class:`~sb_crossmodal_kd.brain.CTCBrain`; every condition of the
ablation (AM alone, label interpolation, one auxiliary head, the full hierarchy, the
hierarchy minus a level, each with or without MoE) is a matter of hparams:

- ``modules.auxiliary_heads`` (optional): an
  :class:`~sb_crossmodal_kd.nnet.heads.AuxiliaryHeads` (``hparams/heads.yaml``). Their tap
  layers are read from ``modules[<tap_module>]`` (default ``encoder``) with
  :class:`~sb_crossmodal_kd.nnet.taps.EncoderTaps`;
- ``distillation`` (optional): a :class:`~sb_crossmodal_kd.losses.DistillationObjective`
  (``hparams/kd.yaml``): label interpolation on the main output, tau^2 scaling, MoE weight.
  Without it: CTC plus the heads' terms plus MoE auxiliary losses at weight 1. Its
  ``main_blank_index`` defaults to ``hparams["blank_index"]``. With
  ``label_interpolation_frames: ctc``, label interpolation trains the frames of the best CTC
  path of ``batch.tokens`` (the CTC loss's targets, which must equal the main unit type's
  ``{u}_units``) through the main output, recomputed every batch;
- MoE layers anywhere in the modules are handled by
  :class:`~sb_crossmodal_kd.moe_brain.MoEMixin` (padding, epoch, usage statistics); their
  auxiliary losses join the distillation objective, at its MoE weight.

Distillation is a training objective: on valid and test the Brain runs the main output only
(no taps, no heads, no teacher needed) and reports CTC loss, WER and CER, so evaluation is
exactly the inference model.

Batch fields, per unit type ``u`` (:mod:`sb_crossmodal_kd.units.types`) that a head or label
interpolation uses (the units and alignment pipeline and :func:`teacher_items` provide them):

- ``{u}_units``: LongTensor ``[K]`` per utterance, the unit sequence;
- ``{u}_frame_to_position``: LongTensor ``[T']`` per utterance at the encoder frame rate,
  the position in ``{u}_units`` of each frame's unit, ``-1`` where there is none. Padding
  added by collation is masked through the field's own lengths, whatever its value;
- ``{u}_top_probs`` ``[K, k]``, ``{u}_top_ids`` ``[K, k]``, ``{u}_residual`` ``[K]``: the
  teacher triple, when that unit type is distilled (a head with ``alpha > 0``, or label
  interpolation with ``lambda > 0``:
  :meth:`~sb_crossmodal_kd.losses.DistillationObjective.teacher_unit_types`), read from
  its :class:`~sb_crossmodal_kd.teachers.cache.TeacherCache` by :func:`teacher_items` in the
  loader workers. A head whose ``tau`` differs from the temperature its cache in
  ``hparams["teacher_caches"]`` was built at is refused when ``fit`` starts
  (:func:`check_teacher_temperatures`).

The data flows one way: the datasets deliver each utterance's fields already fitted to its
encoder frames, and the Brain builds targets and losses from the batch alone.

Every loss term is averaged over the epoch and logged with the train stats
(``main``, ``li_main``, ``kd_<head>``, ``<loss>_<head>``, ``moe``, ``total``), with each
head's frame accuracy against its aligned units (``acc_<head>``). The test
results' ``params`` counts the inference model (without heads); ``params_with_heads`` the
trained one. With MoE layers, every training epoch logs each layer's expert usage (gate
entropy, least and most used expert's share of the gate mass; TensorBoard too when the
hparams have a ``tensorboard_logger``), the last one draws it, and the test pass reports per
layer mean gate mass and gate entropy, joint usage of consecutive layers and expert paths
used (in the results file; heat maps and the full report in ``expert_usage/`` beside it).
"""

import contextlib

import speechbrain as sb
import torch

from sb_crossmodal_kd.alignment.framerate import ENCODER_FRAME_TOLERANCE, fit_to_length
from sb_crossmodal_kd.brain import CTCBrain, count_parameters
from sb_crossmodal_kd.distributed import sum_across_processes, unwrap
from sb_crossmodal_kd.lengths import input_lengths, lengths_to_mask
from sb_crossmodal_kd.losses import (
    DistillationObjective,
    UnitTargets,
    aligned_units,
    frame_mask,
)
from sb_crossmodal_kd.moe_brain import MoEMixin
from sb_crossmodal_kd.nnet.heads import inference_modules
from sb_crossmodal_kd.nnet.taps import EncoderTaps
from sb_crossmodal_kd.stage_stats import stage_loss_across_processes

__all__ = ["KDBrain", "KDMixin", "teacher_items", "check_teacher_temperatures",
           "fit_frames"]

TEACHER_FIELDS = ("top_probs", "top_ids", "residual")


def teacher_items(caches):
    """SpeechBrain dynamic items giving each utterance's teacher triple from its cache.

    Arguments
    ---------
    caches : dict of str to TeacherCache
        Teacher caches by unit type.

    Returns
    -------
    items : list
        Dynamic items (``takes("id")``); add them with ``dataset.add_dynamic_item``.
    keys : list of str
        Their output keys, to add to ``set_output_keys``.
    """
    items, keys = [], []
    for unit_type, cache in caches.items():
        provides = [f"{unit_type}_{name}" for name in TEACHER_FIELDS]

        def read(utt_id, cache=cache):
            return cache.utterance(utt_id)

        items.append(sb.utils.data_pipeline.DynamicItem(takes=["id"], func=read,
                                                        provides=provides))
        keys += provides
    return items, keys


def check_teacher_temperatures(heads, caches):
    """Refuses a head whose ``tau`` differs from the temperature of its teacher cache.

    One ``tau`` per head softens both sides of its KL term: the head's logits (in
    :func:`~sb_crossmodal_kd.losses.distillation_loss`) and the teacher's distribution, which
    a cache holds as built (``header["temperature"]``). Heads with ``alpha`` 0 read no teacher
    and are not checked; nor are unit types without an opened cache.

    Arguments
    ---------
    heads : sb_crossmodal_kd.nnet.heads.AuxiliaryHeads or None
        The heads.
    caches : dict
        Teacher caches by unit type. Entries that are not opened caches (no ``header``, e.g.
        a factory not called yet) are skipped.

    Raises
    ------
    sb_crossmodal_kd.teachers.cache.CacheMismatchError
        Naming the head, the cache folder and both temperatures.
    """
    from sb_crossmodal_kd.teachers.cache import CacheMismatchError

    for name, head in (heads or {}).items():
        if head.alpha <= 0:
            continue
        cache = caches.get(head.unit_type)
        header = getattr(cache, "header", None)
        if not isinstance(header, dict) or "temperature" not in header:
            continue
        built = float(header["temperature"])
        if built != head.tau:
            raise CacheMismatchError(
                f"Auxiliary head '{name}' has tau={head.tau} but its teacher cache "
                f"{cache.folder} was built at temperature {built}: one tau softens both the "
                f"head and its teacher. Set the head's tau to {built} (in the KD recipe the "
                f"{head.unit_type}_tau key of base.yaml sets head and cache) or rebuild the "
                f"cache at {head.tau} (prep setting teacher_tau, or `sbkd teacher-cache "
                "--tau`)."
            )


def fit_frames(frame_to_position, lengths, n_frames, tolerance=ENCODER_FRAME_TOLERANCE, ids=None):
    """Masks collation padding to ``-1`` and fits an alignment batch to ``n_frames`` frames
    (:func:`~sb_crossmodal_kd.alignment.framerate.fit_to_length`).

    Arguments
    ---------
    frame_to_position : torch.Tensor
        ``[B, T_a]`` int, as collated (padding of any value).
    lengths : torch.Tensor
        ``[B]`` its relative lengths.
    n_frames : int
        Encoder frames ``T'`` of the batch.
    tolerance : int
        Largest ``|T_a - T'|`` accepted (front-end rounding); larger is an error.
    ids : list of str, optional
        Utterance IDs, for the error message.

    Returns
    -------
    torch.Tensor
        ``[B, n_frames]`` int, ``-1`` on padding and on frames past the alignment.

    Example
    -------
    >>> fit_frames(torch.tensor([[0, 1, 1], [0, 0, 0]]), torch.tensor([1.0, 1 / 3]), 4)
    tensor([[ 0,  1,  1, -1],
            [ 0, -1, -1, -1]])
    """
    aligned = frame_to_position.shape[1]
    real = lengths_to_mask(lengths.to(frame_to_position.device), aligned)
    frame_to_position = torch.where(real, frame_to_position, torch.full_like(frame_to_position, -1))
    return fit_to_length(frame_to_position, n_frames, tolerance, list(ids or []), fill=-1)


class KDMixin(MoEMixin):
    """Adds auxiliary heads, their distillation and the MoE losses to any SpeechBrain Brain.

    Put it before the Brain you have: ``class MyASR(KDMixin, ASR)``. It wraps that Brain's
    ``compute_forward`` (taps the encoder layers the heads sit on) and
    ``compute_objectives`` (adds the heads' terms and the MoE auxiliary losses to the loss
    that Brain returns); as a :class:`~sb_crossmodal_kd.moe_brain.MoEMixin` it also gives
    MoE layers the batch's padding and the epoch and logs their expert usage (each training
    epoch; cross-layer usage on the test pass); nothing of the Brain's own code changes.
    Its settings come from the hparams as for :class:`KDBrain` (module docstring): ``modules.auxiliary_heads``,
    ``distillation``, ``tap_module`` (the module holding the encoder layers; default
    ``encoder``, e.g. ``Transformer`` for SpeechBrain's ``TransformerASR``), and the batch's
    unit and teacher fields.

    The heads' targets are per utterance of the batch. A Brain whose augmentation
    concatenates copies of the batch (SpeechBrain's ``Augmenter`` with ``concat_original``)
    gets them repeated to match; an augmentation that changes the length (speed
    perturbation) would misalign the frame targets, and batches more than a couple of
    frames off are refused (:func:`fit_frames`).

    A Brain with label interpolation on its main output overrides :meth:`kd_main_output`; one
    whose batch holds its input elsewhere than ``sig`` or ``feats`` overrides
    :meth:`kd_input_lengths` (also the MoE layers' padding).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.objective = getattr(self.hparams, "distillation", None) or DistillationObjective()
        if self.objective.main_blank_index is None:
            # The main output's CTC blank is not a unit of the teacher (see losses).
            self.objective.main_blank_index = getattr(self.hparams, "blank_index", None)
        self.tap_module = getattr(self.hparams, "tap_module", "encoder")
        heads = self._heads()
        self.taps = None
        if heads is not None and len(heads) > 0:
            if self.tap_module not in self.modules:
                raise ValueError(
                    f"The auxiliary heads tap modules['{self.tap_module}'], which the Brain "
                    f"does not have (it has {sorted(self.modules)}): set hparams tap_module "
                    "to the module holding the encoder layers"
                )
            self.taps = EncoderTaps(self.modules[self.tap_module], layers=heads.layers)
        self.head_logits = None  # by head name, from the latest training forward pass
        self._moe_loss = None  # the latest training batch's, for the objective
        self._term_sums, self._term_batches = {}, 0

    def _heads(self):
        """The auxiliary heads module (unwrapped under DDP: read for its settings), or None."""
        if "auxiliary_heads" not in self.modules:
            return None
        return unwrap(self.modules["auxiliary_heads"])

    kd_input_lengths = staticmethod(input_lengths)  # the batch's feats, else sig, lengths

    def moe_input_lengths(self, batch):
        """The MoE layers' padding: :meth:`kd_input_lengths`."""
        return self.kd_input_lengths(batch)

    def kd_main_output(self, predictions, batch):
        """What label interpolation needs of the main output: ``{"main_logits": [B, T, V],
        "frame_lens": [B], "main_tokens": (tokens, lengths)}``, or None (the default: the
        Brain's predictions are its own; heads and MoE terms need none of them)."""
        return None

    # Forward -------------------------------------------------------------------------------

    def compute_forward(self, batch, stage):
        """The Brain's own forward pass; in training also :attr:`head_logits` by head name."""
        training = stage == sb.Stage.TRAIN
        tap_context = self.taps.capture() if (training and self.taps) else contextlib.nullcontext()
        with tap_context as hidden:
            predictions = super().compute_forward(batch, stage)
        self.head_logits = None
        if training and self.taps:
            self.head_logits = self.modules["auxiliary_heads"](hidden)
        return predictions

    # Objectives ----------------------------------------------------------------------------

    def _unit_types(self):
        heads = self._heads()
        return self.objective.required_unit_types(heads)

    def _needs_teacher(self, unit_type):
        return unit_type in self.objective.teacher_unit_types(self._heads())

    def unit_targets(self, batch, n_frames, repeats=1):
        """Reads the batch's unit fields into ``{unit_type: UnitTargets}`` on the device,
        each utterance's ``repeats`` times (a batch its augmentation concatenated copies of)."""
        targets = {}
        for unit_type in self._unit_types():
            fields = (f"{unit_type}_units", f"{unit_type}_frame_to_position")
            if not all(hasattr(batch, field) for field in fields):
                raise KeyError(
                    f"The batch has no fields {' / '.join(fields)} for unit type "
                    f"'{unit_type}': add the units/alignment pipeline for it to the datasets' "
                    "dynamic items and output keys, or "
                    "drop the head / label interpolation that needs it."
                )
            units, f2p = (getattr(batch, field) for field in fields)
            frame_to_position = fit_frames(
                f2p.data.to(self.device), f2p.lengths.to(self.device), n_frames,
                ENCODER_FRAME_TOLERANCE, batch.id,
            )
            unit_ids = units.data.to(self.device)
            teacher = None
            if self._needs_teacher(unit_type):
                teacher = self._teacher(batch, unit_type, unit_ids.shape[1])
            if repeats > 1:
                unit_ids, frame_to_position = (_repeat(unit_ids, repeats),
                                               _repeat(frame_to_position, repeats))
                teacher = teacher and tuple(_repeat(part, repeats) for part in teacher)
            targets[unit_type] = UnitTargets(
                unit_ids, _repeat(units.lengths.to(self.device), repeats), frame_to_position,
                teacher,
            )
        return targets

    def _teacher(self, batch, unit_type, n_positions):
        names = [f"{unit_type}_{name}" for name in TEACHER_FIELDS]
        if not all(hasattr(batch, name) for name in names):
            raise KeyError(
                f"No teacher for unit type '{unit_type}': the batch has no {' / '.join(names)} "
                "fields. Add the teacher cache's dynamic items to the train set "
                "(sb_crossmodal_kd.kd_brain.teacher_items, as the KD recipe's add_kd_items "
                "does), or set the head's alpha to 0 to train it on hard labels only."
            )
        triple = tuple(getattr(batch, name).data.to(self.device) for name in names)
        if triple[0].shape[1] != n_positions:
            raise ValueError(
                f"Teacher for '{unit_type}' has {triple[0].shape[1]} positions but the unit "
                f"sequences have {n_positions} in batch {list(batch.id)[:4]}...: the teacher "
                "cache was built from other unit sequences."
            )
        return triple

    def compute_objectives(self, predictions, batch, stage):
        """The Brain's own loss (plus its scoring on valid/test); in training also every
        head's and MoE layer's term (the distillation objective)."""
        main_loss = super().compute_objectives(predictions, batch, stage)
        moe_loss, self._moe_loss = self._moe_loss, None
        if stage != sb.Stage.TRAIN:
            return main_loss
        main = self.kd_main_output(predictions, batch) or {}
        head_logits = self.head_logits
        if "main_logits" in main:
            n_batch, n_frames = main["main_logits"].shape[:2]
        elif head_logits:
            n_batch, n_frames = next(iter(head_logits.values())).shape[:2]
        else:
            n_batch, n_frames = len(batch.id), None
        repeats = n_batch // len(batch.id)
        targets = self.unit_targets(batch, n_frames, repeats) if n_frames is not None else {}
        frame_lens = main.get("frame_lens")
        if frame_lens is None:
            frame_lens = _repeat(self.kd_input_lengths(batch).to(self.device), repeats)
        total, log = self.objective(
            main_loss,
            main_logits=main.get("main_logits"),
            heads=self._heads(),
            head_logits=head_logits,
            targets=targets,
            frame_lens=frame_lens,
            moe_loss=moe_loss,
            main_tokens=main.get("main_tokens"),
        )
        if head_logits:
            log.update(self.head_accuracies(head_logits, targets, frame_lens))
        for name, value in log.items():  # summed on the device: no sync per batch
            self._term_sums[name] = self._term_sums.get(name, 0.0) + value
        self._term_batches += 1
        return total

    def add_moe_loss(self, loss, moe_loss, stage):
        """Keeps a training batch's MoE loss for the distillation objective, which weighs
        it; an evaluation pass's is dropped (evaluation scores the Brain's own loss)."""
        self._moe_loss = moe_loss if stage == sb.Stage.TRAIN else None
        return loss

    @torch.no_grad()
    def head_accuracies(self, head_logits, targets, frame_lens=None):
        """``{"acc_<head>": tensor}``: how often each head's top unit is the aligned unit,
        over frames with a unit (a check that the heads learn what their level means)."""
        accuracies = {}
        for name, head in self._heads().items():
            target = targets[head.unit_type]
            guess = head.unit_logits(head_logits[name]).argmax(-1)
            truth = aligned_units(target.units, target.frame_to_position)
            mask = frame_mask(target.frame_to_position, frame_lens)
            hits = ((guess == truth) & mask).sum()
            accuracies[f"acc_{name}"] = hits / mask.sum().clamp(min=1)
        return accuracies

    # Stages --------------------------------------------------------------------------------

    def on_fit_start(self):
        """Refuses, before any training, a head whose ``tau`` differs from the temperature
        of its teacher cache in ``hparams["teacher_caches"]``
        (:func:`check_teacher_temperatures`)."""
        check_teacher_temperatures(self._heads(), getattr(self.hparams, "teacher_caches", None)
                                   or {})
        super().on_fit_start()

    def on_stage_start(self, stage, epoch=None):
        """Resets the term averages."""
        super().on_stage_start(stage, epoch)
        if stage == sb.Stage.TRAIN:
            self._term_sums, self._term_batches = {}, 0

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Adds every loss term's epoch average to the Brain's ``train_stats`` (which its
        own ``on_stage_end`` sets and logs)."""
        super().on_stage_end(stage, stage_loss, epoch)
        if stage == sb.Stage.TRAIN and self._term_batches:
            terms = self.loss_terms()
            if isinstance(getattr(self, "train_stats", None), dict):
                self.train_stats.update(terms)
            else:
                loss = stage_loss_across_processes(stage, stage_loss, self.device)
                self.train_stats = {"loss": loss, **terms}

    def loss_terms(self):
        """Epoch averages of every loss term (``loss_<term>``) and head accuracy
        (``acc_<head>``) so far (one device sync); under DDP over all processes' batches
        (a collective: every rank calls it, with the same terms)."""
        names = sorted(self._term_sums)
        sums = [torch.as_tensor(self._term_sums[n], dtype=torch.float64, device=self.device)
                for n in names]
        batches = torch.tensor(float(self._term_batches), dtype=torch.float64, device=self.device)
        *sums, batches = sum_across_processes([*sums, batches])
        return {
            (name if name.startswith("acc_") else f"loss_{name}"):
                round(float(total) / float(batches), 5)
            for name, total in zip(names, sums, strict=True)
        }

    def intra_epoch_state(self):
        """The epoch's loss-term sums (and expert-usage counts), for a mid-epoch checkpoint."""
        state = super().intra_epoch_state()
        state["term_sums"] = {n: torch.as_tensor(v).detach().cpu()
                              for n, v in self._term_sums.items()}
        state["term_batches"] = self._term_batches
        return state

    def load_intra_epoch_state(self, state):
        super().load_intra_epoch_state(state)
        self._term_sums = {n: v.to(self.device) for n, v in state["term_sums"].items()}
        self._term_batches = state["term_batches"]


class KDBrain(KDMixin, CTCBrain):
    """CTC acoustic model trained with auxiliary heads, distillation and MoE losses:
    :class:`KDMixin` on :class:`~sb_crossmodal_kd.brain.CTCBrain`, with label
    interpolation on the CTC output.

    Arguments are those of ``speechbrain.core.Brain``; the settings it reads are in the
    module docstring. Example (a full training run) in ``tests/test_kd_brain.py``.
    """

    def kd_main_output(self, predictions, batch):
        """The CTC output's log-probabilities (log-softmax is idempotent: they serve as
        logits), its frame lengths and the CTC loss's targets (what ``ctc`` label
        interpolation frames align)."""
        return {"main_logits": predictions["log_probs"], "frame_lens": predictions["lengths"],
                "main_tokens": batch.tokens}

    def test_results(self, stats, stage_loss):
        """CTCBrain's results; ``params`` counts the inference model (the heads are dropped
        for inference), ``params_with_heads`` the trained one; an MoE model's expert usage
        on the test utterances (:func:`~sb_crossmodal_kd.analysis.expert_usage.usage_results`)
        with its heat maps in ``expert_usage/`` beside ``results_file``."""
        results = super().test_results(stats, stage_loss)
        if self._heads() is not None:
            results["params_with_heads"] = results["params"]
            results["params"] = count_parameters(inference_modules(self.modules))
        return self.results_with_expert_usage(results)


def _repeat(tensor, repeats):
    """``tensor`` [B, ...] as [repeats * B, ...]: copies one after the other, as
    SpeechBrain's Augmenter concatenates a batch with its augmented copies."""
    if tensor is None or repeats == 1:
        return tensor
    return torch.cat([tensor] * repeats)
