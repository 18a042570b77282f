"""Losses of cross-modal distillation (Lee and Chang 2021), each usable alone.

Inputs shared by all functions:

* ``logits [B, T, V]``: a model output per encoder frame (any float dtype; every
  log-softmax is computed in float32, so fp16/bf16 autocast is safe).
* ``frame_to_position [B, T]`` (int): the position ``k(t)`` of the unit each frame belongs
  to in the utterance's unit sequence, ``-1`` where there is none (silence, CTC blank
  frames, padding). Frames at ``-1`` contribute nothing, neither value nor gradient.
* ``units [B, K]`` (int): the unit sequences.
* a teacher triple ``(top_probs [B, K, k], top_ids [B, K, k], residual [B, K])``: per unit
  position, the teacher's ``k`` most likely units, their probabilities, and the mass
  ``residual = 1 - sum(top_probs)`` it puts on all other units.
* ``lengths [B]`` (optional): SpeechBrain relative lengths of the frame axis; frames past
  them are masked too, so padding need not be ``-1``.

**Residual convention.** The teacher is known only on its top-k ids. The residual mass is
treated as one lumped event "any other unit", and the student's probability of that event
is ``P_rest = sum_{i not in topk} p_i``. The KL divergence is then

    KL(q || p) = sum_{i in topk} q_i (log q_i - log p_i) + r (log r - log P_rest)

which is the exact KL between the teacher and the student both coarsened to the
``k + 1`` events ``{top-k ids, rest}``; it equals the full KL when ``k = V``
(``r = 0``). ``log P_rest`` is computed as a logsumexp over the non-top-k logits,
never as ``log(1 - sum p)``, which loses all precision when ``P_rest`` is small.

**Temperature.** One ``tau`` per head softens both sides of its KL term. The teacher triple
must already be the teacher's ``softmax(logits / tau)``: a teacher cache is built at one
temperature (:func:`~sb_crossmodal_kd.teachers.cache.build_cache`), and a head whose ``tau``
differs from its cache's is refused before training
(:func:`~sb_crossmodal_kd.kd_brain.check_teacher_temperatures`). Here ``tau`` divides the
student's logits before the log-softmax; the triple is used as given. With both sides
softened the gradient shrinks as ``1/tau^2``, so Hinton's ``tau^2`` factor
(``scale_by_tau_squared``, off by default) is the compensation that keeps a term's weight
independent of ``tau``.

Example
-------
>>> import torch
>>> logits = torch.randn(1, 4, 5)
>>> units = torch.tensor([[2, 3]])
>>> frame_to_position = torch.tensor([[-1, 0, 1, 1]])
>>> teacher = (torch.tensor([[[0.7, 0.2], [0.5, 0.4]]]), torch.tensor([[[2, 1], [3, 2]]]),
...            torch.tensor([[0.1, 0.1]]))
>>> kd = distillation_loss(logits, teacher, frame_to_position)
>>> li = label_interpolation_loss(logits, units, frame_to_position, teacher, lam=0.0)
>>> bool(torch.allclose(li, frame_ce_loss(logits, units, frame_to_position)))
True
"""

from dataclasses import dataclass

import torch

from sb_crossmodal_kd.alignment.ctc import ctc_frame_positions
from sb_crossmodal_kd.lengths import absolute_lengths, lengths_to_mask

__all__ = [
    "frame_mask",
    "aligned_units",
    "gather_teacher_to_frames",
    "frame_ce_loss",
    "label_interpolation_loss",
    "topk_kl_divergence",
    "distillation_loss",
    "head_hard_loss",
    "UnitTargets",
    "auxiliary_losses",
    "combine_losses",
    "DistillationObjective",
]

# Stands in for -inf in masked logits: exp() of it is 0, and unlike -inf it never turns a
# logsumexp gradient into NaN when a whole row is masked.
_MASKED_LOGIT = -1e30
REDUCTIONS = ("mean", "sum", "none")


def _wide(x):
    """At least float32 (half-precision softmax saturates); float64 stays float64."""
    return x if x.dtype == torch.float64 else x.float()


def _check_frames(name, logits, frame_to_position):
    if frame_to_position.dim() != 2 or logits.shape[:2] != frame_to_position.shape:
        raise ValueError(
            f"{name}: frame_to_position {tuple(frame_to_position.shape)} does not match the "
            f"frames of the output {tuple(logits.shape)}: alignments must be at the encoder "
            "frame rate (after subsampling), shape [batch, frames]."
        )
    if frame_to_position.dtype.is_floating_point:
        raise TypeError(f"{name}: frame_to_position must be an integer tensor.")


def frame_mask(frame_to_position, lengths=None):
    """Frames that belong to a unit: ``frame_to_position >= 0`` and within ``lengths``.

    Arguments
    ---------
    frame_to_position : torch.Tensor
        ``[B, T]`` int, ``-1`` where a frame has no unit.
    lengths : torch.Tensor, optional
        ``[B]`` relative lengths (SpeechBrain convention).

    Returns
    -------
    torch.Tensor
        ``[B, T]`` bool.

    Example
    -------
    >>> frame_mask(torch.tensor([[0, 0, 1, -1], [0, 1, 1, 2]]), torch.tensor([1.0, 0.5]))
    tensor([[ True,  True,  True, False],
            [ True,  True, False, False]])
    """
    mask = frame_to_position >= 0
    if lengths is not None:
        mask = mask & lengths_to_mask(lengths, frame_to_position.shape[1])
    return mask


def _reduce(per_frame, mask, reduction, name):
    """Masked reduction without any host sync (``where``, not boolean indexing)."""
    per_frame = torch.where(mask, per_frame, torch.zeros_like(per_frame))
    if reduction == "none":
        return per_frame
    if reduction == "sum":
        return per_frame.sum()
    if reduction == "mean":
        return per_frame.sum() / mask.sum().clamp(min=1)
    raise ValueError(f"{name}: reduction '{reduction}' is not one of {REDUCTIONS}.")


def _check_positions(frame_to_position, n_positions, name):
    # Only on CPU: on an accelerator this check would cost a device sync every step.
    if frame_to_position.device.type == "cpu" and frame_to_position.numel():
        largest = int(frame_to_position.max())
        if largest >= n_positions:
            raise ValueError(
                f"{name}: frame_to_position refers to unit position {largest}, but the unit "
                f"sequences / teacher have only {n_positions} positions. The alignment and "
                "the unit sequence (or teacher cache) were built from different transcripts "
                "or unit inventories: rebuild them together."
            )


def aligned_units(units, frame_to_position):
    """Per-frame unit ids ``y_{k(t)}``: ``[B, T]`` (0 where a frame has no unit).

    Example
    -------
    >>> aligned_units(torch.tensor([[7, 8]]), torch.tensor([[-1, 0, 1, 1]]))
    tensor([[0, 7, 8, 8]])
    """
    _check_positions(frame_to_position, units.shape[1], "aligned_units")
    if units.shape[1] == 0:
        return torch.zeros_like(frame_to_position, dtype=units.dtype)
    ids = units.gather(1, frame_to_position.clamp(min=0))
    return torch.where(frame_to_position >= 0, ids, torch.zeros_like(ids))


def gather_teacher_to_frames(top_probs, top_ids, residual, frame_to_position):
    """Gathers per-position teacher triples to per-frame ones through the alignment.

    Arguments
    ---------
    top_probs : torch.Tensor
        ``[B, K, k]`` float.
    top_ids : torch.Tensor
        ``[B, K, k]`` int.
    residual : torch.Tensor
        ``[B, K]`` float.
    frame_to_position : torch.Tensor
        ``[B, T]`` int, ``-1`` where a frame has no unit.

    Returns
    -------
    tuple
        ``(top_probs [B, T, k], top_ids [B, T, k], residual [B, T])``; frames without a
        unit get position 0's values (mask them with :func:`frame_mask`).

    Example
    -------
    >>> probs, ids, rest = gather_teacher_to_frames(
    ...     torch.tensor([[[0.9], [0.6]]]), torch.tensor([[[4], [5]]]),
    ...     torch.tensor([[0.1, 0.4]]), torch.tensor([[1, 1, 0, -1]]))
    >>> ids[..., 0], rest
    (tensor([[5, 5, 4, 4]]), tensor([[0.4000, 0.4000, 0.1000, 0.1000]]))
    """
    batch, n_positions, k = top_probs.shape
    if top_ids.shape != top_probs.shape or residual.shape != (batch, n_positions):
        raise ValueError(
            "Teacher triple shapes disagree: top_probs "
            f"{tuple(top_probs.shape)}, top_ids {tuple(top_ids.shape)}, residual "
            f"{tuple(residual.shape)}; expected [B, K, k], [B, K, k], [B, K]."
        )
    if frame_to_position.shape[0] != batch:
        raise ValueError(
            f"Teacher batch size {batch} != alignment batch size {frame_to_position.shape[0]}."
        )
    n_frames = frame_to_position.shape[1]
    if n_positions == 0:  # no utterance in the batch has a unit: nothing to gather
        return (
            top_probs.new_zeros(batch, n_frames, k),
            top_ids.new_zeros(batch, n_frames, k),
            residual.new_zeros(batch, n_frames),
        )
    _check_positions(frame_to_position, n_positions, "gather_teacher_to_frames")
    positions = frame_to_position.clamp(min=0)
    index = positions[:, :, None].expand(batch, n_frames, k)
    return (
        top_probs.gather(1, index),
        top_ids.long().gather(1, index),  # caches may store int32 ids; indexing needs int64
        residual.gather(1, positions),
    )


def frame_ce_loss(logits, units, frame_to_position, lengths=None, reduction="mean"):
    """Cross-entropy of each frame's output against the unit aligned to it.

    Arguments
    ---------
    logits : torch.Tensor
        ``[B, T, V]``.
    units : torch.Tensor
        ``[B, K]`` int unit sequences.
    frame_to_position : torch.Tensor
        ``[B, T]`` int, ``-1`` where a frame has no unit.
    lengths : torch.Tensor, optional
        ``[B]`` relative frame lengths.
    reduction : str
        ``mean`` (over unit frames), ``sum`` or ``none`` (``[B, T]``, 0 on masked frames).

    Returns
    -------
    torch.Tensor
        The loss (float32).

    Example
    -------
    >>> logits = torch.zeros(1, 2, 4)
    >>> frame_ce_loss(logits, torch.tensor([[1]]), torch.tensor([[0, -1]]))
    tensor(1.3863)
    """
    _check_frames("frame_ce_loss", logits, frame_to_position)
    log_probs = torch.log_softmax(_wide(logits), dim=-1)
    targets = aligned_units(units, frame_to_position)
    nll = -log_probs.gather(-1, targets[..., None]).squeeze(-1)
    return _reduce(nll, frame_mask(frame_to_position, lengths), reduction, "frame_ce_loss")


def _rest_log_prob(z, log_norm, top_ids, excluded_index=None):
    """``log P_rest`` per frame and whether the rest event is empty, from float32 logits.

    ``log P_rest = logsumexp(z_j, j not in topk) - logsumexp(z)``, by masking, so it stays
    exact when ``P_rest`` is tiny.
    """
    in_topk = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, top_ids, True)
    if excluded_index is not None:
        in_topk[..., excluded_index] = True
    rest_logits = z.masked_fill(in_topk, _MASKED_LOGIT)
    log_rest = torch.logsumexp(rest_logits, dim=-1) - log_norm
    return log_rest, in_topk.all(dim=-1)


def label_interpolation_loss(
    logits,
    units,
    frame_to_position,
    teacher,
    lam,
    lengths=None,
    blank_index=None,
    reduction="mean",
):
    """Cross-entropy against hard labels interpolated with the teacher (the LI baseline).

    Per frame ``t`` with a unit: ``target_t = (1 - lam) onehot(y_{k(t)}) + lam q_{k(t)}``
    and the loss is ``CE(target_t, p_t)``, where the teacher's residual mass is the lumped
    event "any other unit" (see the module docstring):

        CE = -(1 - lam) log p_y - lam (sum_{i in topk} q_i log p_i + r log P_rest)

    With ``lam = 0`` this is exactly :func:`frame_ce_loss`.

    Arguments
    ---------
    logits : torch.Tensor
        ``[B, T, V]`` main output.
    units : torch.Tensor
        ``[B, K]`` int unit sequences.
    frame_to_position : torch.Tensor
        ``[B, T]`` int, ``-1`` where a frame has no unit.
    teacher : tuple or None
        ``(top_probs [B, K, k], top_ids [B, K, k], residual [B, K])``; may be None only if
        ``lam == 0``.
    lam : float
        Interpolation weight of the teacher, in ``[0, 1]``.
    lengths : torch.Tensor, optional
        ``[B]`` relative frame lengths.
    blank_index : int, optional
        An output that is not a unit (the CTC blank of a CTC main output): not part of the
        teacher's "other units" event. The softmax still runs over all outputs.
    reduction : str
        ``mean`` (over unit frames), ``sum`` or ``none``.

    Returns
    -------
    torch.Tensor
        The loss (float32).

    Example
    -------
    >>> logits = torch.zeros(1, 1, 4)
    >>> teacher = (torch.tensor([[[1.0]]]), torch.tensor([[[2]]]), torch.zeros(1, 1))
    >>> label_interpolation_loss(logits, torch.tensor([[1]]), torch.tensor([[0]]), teacher, 0.5)
    tensor(1.3863)
    """
    _check_frames("label_interpolation_loss", logits, frame_to_position)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"label_interpolation_loss: lam must be in [0, 1], got {lam}.")
    mask = frame_mask(frame_to_position, lengths)
    z = _wide(logits)
    log_probs = torch.log_softmax(z, dim=-1)
    targets = aligned_units(units, frame_to_position)
    nll = -log_probs.gather(-1, targets[..., None]).squeeze(-1)
    if lam == 0.0:
        return _reduce(nll, mask, reduction, "label_interpolation_loss")
    if teacher is None:
        raise ValueError("label_interpolation_loss: lam > 0 needs a teacher triple.")
    top_probs, top_ids, residual = gather_teacher_to_frames(*teacher, frame_to_position)
    top_probs, residual = _wide(top_probs).detach(), _wide(residual).detach()  # fixed targets
    log_rest, rest_empty = _rest_log_prob(z, torch.logsumexp(z, -1), top_ids, blank_index)
    soft = -(top_probs * log_probs.gather(-1, top_ids)).sum(-1)
    use_rest = (residual > 0) & ~rest_empty
    soft = soft - torch.where(use_rest, residual * log_rest, torch.zeros_like(log_rest))
    loss = (1.0 - lam) * nll + lam * soft
    return _reduce(loss, mask, reduction, "label_interpolation_loss")


def topk_kl_divergence(logits, top_probs, top_ids, residual, tau=1.0):
    """Per-frame ``KL(q || p)`` of a top-k teacher against a student, residual lumped.

    Arguments
    ---------
    logits : torch.Tensor
        ``[..., V]`` student logits.
    top_probs : torch.Tensor
        ``[..., k]`` teacher probabilities of its top-k ids.
    top_ids : torch.Tensor
        ``[..., k]`` int ids into ``V`` (distinct within a row).
    residual : torch.Tensor
        ``[...]`` teacher mass outside the top-k.
    tau : float
        Student temperature: ``p = softmax(logits / tau)``.

    Returns
    -------
    torch.Tensor
        ``[...]`` float32 KL per frame, ``>= 0`` up to rounding.

    Example
    -------
    >>> logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    >>> kl = topk_kl_divergence(logits, torch.tensor([0.5, 0.3]), torch.tensor([0, 1]),
    ...                         torch.tensor(0.2))
    >>> abs(float(kl)) < 1e-6
    True
    """
    z = _wide(logits) / tau
    log_norm = torch.logsumexp(z, dim=-1)
    log_probs = torch.log_softmax(z, dim=-1)
    q = _wide(top_probs).detach()  # the teacher is a fixed target
    r = _wide(residual).detach()
    top_ids = top_ids.long()
    kl = (torch.special.xlogy(q, q) - q * log_probs.gather(-1, top_ids)).sum(-1)
    log_rest, rest_empty = _rest_log_prob(z, log_norm, top_ids)
    # A residual with no "other" unit left (k = V) can only be rounding: it is ignored.
    use_rest = (r > 0) & ~rest_empty
    rest_term = torch.special.xlogy(r, r) - r * log_rest
    return kl + torch.where(use_rest, rest_term, torch.zeros_like(rest_term))


def distillation_loss(
    logits,
    teacher,
    frame_to_position,
    tau=1.0,
    lengths=None,
    scale_by_tau_squared=False,
    reduction="mean",
):
    """Auxiliary KL distillation: ``sum_t KL(q_{k(t)} || p_t)`` over frames with a unit.

    Arguments
    ---------
    logits : torch.Tensor
        ``[B, T, V]`` logits of a head over the teacher's unit vocabulary (drop a CTC
        blank first, e.g. ``AuxiliaryHead.unit_logits``).
    teacher : tuple
        ``(top_probs [B, K, k], top_ids [B, K, k], residual [B, K])`` per unit position.
    frame_to_position : torch.Tensor
        ``[B, T]`` int, ``-1`` where a frame has no unit.
    tau : float
        Student temperature.
    lengths : torch.Tensor, optional
        ``[B]`` relative frame lengths.
    scale_by_tau_squared : bool
        Multiply by ``tau^2`` (Hinton et al.); off by default, see the module docstring.
    reduction : str
        ``mean`` (over unit frames), ``sum`` or ``none`` (``[B, T]``).

    Returns
    -------
    torch.Tensor
        The loss (float32).

    Example
    -------
    >>> teacher = (torch.tensor([[[1.0]]]), torch.tensor([[[0]]]), torch.zeros(1, 1))
    >>> distillation_loss(torch.zeros(1, 2, 2), teacher, torch.tensor([[0, -1]]))
    tensor(0.6931)
    """
    _check_frames("distillation_loss", logits, frame_to_position)
    if tau <= 0:
        raise ValueError(f"distillation_loss: tau must be > 0, got {tau}.")
    top_probs, top_ids, residual = gather_teacher_to_frames(*teacher, frame_to_position)
    if top_ids.shape[-1] > logits.shape[-1]:
        raise ValueError(
            f"distillation_loss: the teacher gives {top_ids.shape[-1]} ids per position but "
            f"the student has only {logits.shape[-1]} outputs; unit vocabularies differ."
        )
    kl = topk_kl_divergence(logits, top_probs, top_ids, residual, tau)
    if scale_by_tau_squared:
        kl = kl * (tau * tau)
    return _reduce(kl, frame_mask(frame_to_position, lengths), reduction, "distillation_loss")


@dataclass
class UnitTargets:
    """What a batch carries for one unit type.

    Attributes
    ----------
    units : torch.Tensor
        ``[B, K]`` int unit sequences.
    unit_lens : torch.Tensor
        ``[B]`` relative lengths of ``units``.
    frame_to_position : torch.Tensor
        ``[B, T]`` int alignment, ``-1`` where a frame has no unit.
    teacher : tuple, optional
        ``(top_probs [B, K, k], top_ids [B, K, k], residual [B, K])``.
    """

    units: torch.Tensor
    unit_lens: torch.Tensor
    frame_to_position: torch.Tensor
    teacher: tuple | None = None


def head_hard_loss(head, logits, targets, frame_lens=None):
    """A head's own hard-label loss, by its ``loss`` setting (None for ``none``).

    Arguments
    ---------
    head : sb_crossmodal_kd.nnet.heads.AuxiliaryHead
        The head (gives the loss kind and blank index).
    logits : torch.Tensor
        ``[B, T, n_outputs]`` the head's logits.
    targets : UnitTargets
        The head's unit type's batch fields.
    frame_lens : torch.Tensor, optional
        ``[B]`` relative frame lengths (CTC needs them; frame CE uses them as a mask).

    Returns
    -------
    torch.Tensor or None
    """
    if head.loss == "none":
        return None
    if head.loss == "frame_ce":
        return frame_ce_loss(logits, targets.units, targets.frame_to_position, frame_lens)
    if head.loss == "ctc":
        from speechbrain.nnet.losses import ctc_loss

        if frame_lens is None:
            frame_lens = torch.ones(logits.shape[0], device=logits.device)
        log_probs = torch.log_softmax(_wide(logits), dim=-1)
        return ctc_loss(log_probs, targets.units, frame_lens, targets.unit_lens, head.blank_index)
    raise ValueError(f"Auxiliary head '{head.unit_type}': unknown loss '{head.loss}'.")


def auxiliary_losses(heads, head_logits, targets, frame_lens=None, scale_by_tau_squared=False):
    """Every auxiliary head's distillation and hard-label terms, with their weights.

    Arguments
    ---------
    heads : sb_crossmodal_kd.nnet.heads.AuxiliaryHeads
        The heads (their settings: unit type, loss kind and weight, alpha, tau).
    head_logits : dict of str to torch.Tensor
        Logits by head name, as returned by ``AuxiliaryHeads.forward``.
    targets : dict of str to UnitTargets
        Batch fields by unit type.
    frame_lens : torch.Tensor, optional
        ``[B]`` relative frame lengths.
    scale_by_tau_squared : bool
        See :func:`distillation_loss`.

    Returns
    -------
    dict of str to tuple
        ``{term name: (weight, value)}`` with names ``kd_<head>`` and ``<loss>_<head>``
        (e.g. ``ctc_subword``); ready for :func:`combine_losses`.
    """
    terms = {}
    for name, head in heads.items():
        if head.unit_type not in targets:
            raise KeyError(
                f"Auxiliary head '{name}' predicts unit type '{head.unit_type}', but the "
                f"batch carries only {sorted(targets)}: add its alignment and units to the "
                "data pipeline."
            )
        target = targets[head.unit_type]
        logits = head_logits[name]
        if head.alpha > 0:
            if target.teacher is None:
                raise ValueError(
                    f"Auxiliary head '{name}' has alpha={head.alpha} but the batch has no "
                    f"teacher for unit type '{head.unit_type}': add its teacher cache or set "
                    "alpha: 0."
                )
            kd = distillation_loss(
                head.unit_logits(logits),
                target.teacher,
                target.frame_to_position,
                tau=head.tau,
                lengths=frame_lens,
                scale_by_tau_squared=scale_by_tau_squared,
            )
            terms[f"kd_{name}"] = (head.alpha, kd)
        hard = head_hard_loss(head, logits, target, frame_lens)
        if hard is not None and head.loss_weight > 0:
            terms[f"{head.loss}_{name}"] = (head.loss_weight, hard)
    return terms


def combine_losses(main_loss, terms=None):
    """The hierarchical objective ``L = L_main + sum_a w_a * term_a``, and a log of it.

    Arguments
    ---------
    main_loss : torch.Tensor
        The main output's loss.
    terms : dict of str to tuple, optional
        ``{name: (weight, value)}``: distillation terms (weight ``alpha_a``), heads' hard
        losses, MoE auxiliary losses, ...

    Returns
    -------
    total : torch.Tensor
        The loss to back-propagate.
    log : dict of str to torch.Tensor
        Detached values: ``main``, every term unweighted under its name, and ``total``.

    Example
    -------
    >>> total, log = combine_losses(torch.tensor(2.0), {"kd_subword": (0.5, torch.tensor(1.0))})
    >>> float(total), sorted(log)
    (2.5, ['kd_subword', 'main', 'total'])
    """
    total = main_loss
    log = {"main": main_loss.detach()}
    for name, (weight, value) in (terms or {}).items():
        if name in ("main", "total"):
            raise ValueError(f"combine_losses: '{name}' is reserved; rename the term.")
        total = total + weight * value
        log[name] = value.detach()
    log["total"] = total.detach()
    return total, log


def _check_same_sequences(tokens, token_lens, units, unit_lens, unit_type):
    """Refuses CTC targets that are not the unit sequences the teacher's positions index.

    Shapes are compared always; values only on the CPU (on an accelerator reading them would
    stall every step).
    """
    same = tokens.shape == units.shape
    if same and tokens.device.type == "cpu" and units.device.type == "cpu" and tokens.numel():
        n_tokens = absolute_lengths(token_lens, tokens.shape[1])
        n_units = absolute_lengths(unit_lens, units.shape[1])
        inside = lengths_to_mask(n_tokens, tokens.shape[1])
        same = bool(torch.equal(n_tokens, n_units)) and bool(
            torch.equal(torch.where(inside, tokens.long(), 0), torch.where(inside, units.long(), 0))
        )
    if not same:
        raise ValueError(
            f"label_interpolation_frames: ctc aligns the main output's CTC targets, but they "
            f"differ from the '{unit_type}' unit sequences whose positions the teacher "
            "distributions follow: build both with the same tokenizer from the same text."
        )


class DistillationObjective:
    """The whole training objective of a distilled acoustic model, from hparams settings.

    ``L = L_main [+ w_LI * LI] + sum_a alpha_a KD_a + sum_a w_a hard_a [+ w_MoE * L_MoE]``

    A plain settings holder (not a Module: it owns no parameters; the heads it is given at
    call time stay in the Brain's ``modules``), so every condition of the ablation is a few
    hparams lines.

    Arguments
    ---------
    label_interpolation : float, optional
        ``lambda`` of label interpolation on the main output; ``None`` (default) leaves the
        term out, ``0.0`` adds the plain frame CE (the control of the LI condition).
    label_interpolation_weight : float
        Weight of the label-interpolation term next to the main loss.
    main_unit_type : str
        Unit type of the main output (whose alignment and teacher LI uses).
    main_blank_index : int, optional
        The main output's CTC blank, which is not a unit (see
        :func:`label_interpolation_loss`).
    label_interpolation_frames : str
        Which frames of the main output get the interpolated target of which position:

        - ``alignment`` (default): the main unit type's ``frame_to_position`` from the
          batch (a forced alignment of the units made before training: every frame of a
          unit's span, including those a CTC output would give to blank);
        - ``ctc``: the best CTC path of the main output's target sequence through its own
          log-posteriors, recomputed on every call (detached;
          :func:`~sb_crossmodal_kd.alignment.ctc.ctc_frame_positions`): a frame the path
          emits token ``k`` on gets position ``k``, a blank frame no target. Needs
          ``main_blank_index``; an utterance no CTC path can align gets no target.
    scale_by_tau_squared : bool
        See :func:`distillation_loss`.
    moe_weight : float
        Weight of the MoE auxiliary losses (load balancing, z-loss) when given.

    Example
    -------
    >>> objective = DistillationObjective(label_interpolation=0.0, moe_weight=0.5)
    >>> targets = {"subword": UnitTargets(torch.tensor([[1]]), torch.ones(1),
    ...                                   torch.tensor([[0, -1]]))}
    >>> total, log = objective(torch.tensor(1.0), main_logits=torch.zeros(1, 2, 4),
    ...                        targets=targets, moe_loss=torch.tensor(0.2))
    >>> sorted(log), round(float(total), 4)  # 1 + log(4) + 0.5 * 0.2
    (['li_main', 'main', 'moe', 'total'], 2.4863)

    With ``ctc`` frames, the main output's own CTC path picks them (blank = 3 here; the
    output emits unit 1 on frame 1 only, so frames 0 and 2 get no target):

    >>> ctc = DistillationObjective(label_interpolation=0.0, main_blank_index=3,
    ...                             label_interpolation_frames="ctc")
    >>> peaky = torch.log_softmax(9.0 * torch.eye(4)[torch.tensor([[3, 1, 3]])], -1)
    >>> ctc.frame_positions(peaky, targets["subword"])
    tensor([[-1,  0, -1]])
    """

    FRAMES = ("alignment", "ctc")

    def __init__(
        self,
        label_interpolation=None,
        label_interpolation_weight=1.0,
        main_unit_type="subword",
        main_blank_index=None,
        scale_by_tau_squared=False,
        moe_weight=1.0,
        label_interpolation_frames="alignment",
    ):
        if label_interpolation is not None and not 0.0 <= label_interpolation <= 1.0:
            raise ValueError(
                f"label_interpolation must be in [0, 1] or null, got {label_interpolation}."
            )
        if label_interpolation_frames not in self.FRAMES:
            raise ValueError(
                f"label_interpolation_frames must be one of {self.FRAMES}, got "
                f"'{label_interpolation_frames}'."
            )
        self.label_interpolation_frames = label_interpolation_frames
        self.label_interpolation = label_interpolation
        self.label_interpolation_weight = float(label_interpolation_weight)
        self.main_unit_type = main_unit_type
        self.main_blank_index = main_blank_index
        self.scale_by_tau_squared = bool(scale_by_tau_squared)
        self.moe_weight = float(moe_weight)

    @property
    def uses_label_interpolation(self):
        """Whether the main output gets a frame-level (interpolated) CE term."""
        return self.label_interpolation is not None and self.label_interpolation_weight > 0

    def required_unit_types(self, heads=None):
        """Unit types a batch must carry (alignments, sequences, teachers if used)."""
        needed = set(heads.unit_types) if heads is not None else set()
        if self.uses_label_interpolation:
            needed.add(self.main_unit_type)
        return sorted(needed)

    def teacher_unit_types(self, heads=None):
        """Unit types whose teacher the objective reads: those of heads with ``alpha > 0``,
        and the main unit type under label interpolation with ``lambda > 0``. A head with
        ``alpha`` 0 trains on its hard labels only and needs no teacher.

        Example
        -------
        >>> from sb_crossmodal_kd.nnet.heads import AuxiliaryHead, AuxiliaryHeads
        >>> heads = AuxiliaryHeads(senone=AuxiliaryHead("senone", 1, 8, 9, alpha=0.0),
        ...                        phone=AuxiliaryHead("monophone", 2, 8, 7, alpha=0.5))
        >>> DistillationObjective(label_interpolation=0.3).teacher_unit_types(heads)
        ['monophone', 'subword']
        >>> DistillationObjective(label_interpolation=0.0).required_unit_types(heads)
        ['monophone', 'senone', 'subword']
        """
        needed = set()
        if heads is not None:
            needed |= {head.unit_type for head in heads.values() if head.alpha > 0}
        if self.uses_label_interpolation and self.label_interpolation > 0:
            needed.add(self.main_unit_type)
        return sorted(needed)

    def frame_positions(self, main_logits, target, frame_lens=None, main_tokens=None):
        """``[B, T]`` frame-to-position map of label interpolation, by
        ``label_interpolation_frames``.

        Arguments
        ---------
        main_logits : torch.Tensor
            ``[B, T, V]`` main output (log-posteriors or logits).
        target : UnitTargets
            The main unit type's batch fields.
        frame_lens : torch.Tensor, optional
            ``[B]`` relative frame lengths (those of the CTC loss).
        main_tokens : tuple, optional
            ``(tokens [B, L], relative lengths [B])``: the main output's CTC targets, which
            the ``ctc`` variant aligns (default: ``target.units``). They must be the unit
            sequences the teacher's positions refer to; on CPU tensors this is checked.
        """
        if self.label_interpolation_frames == "alignment":
            return target.frame_to_position
        if self.main_blank_index is None:
            raise ValueError(
                "label_interpolation_frames: ctc needs main_blank_index (the main output's CTC "
                "blank) to align the main output."
            )
        tokens, token_lens = target.units, target.unit_lens
        if main_tokens is not None:
            tokens, token_lens = main_tokens
            _check_same_sequences(tokens, token_lens, target.units, target.unit_lens,
                                  self.main_unit_type)
        return ctc_frame_positions(main_logits, tokens, frame_lens, token_lens,
                                   self.main_blank_index)

    def __call__(
        self,
        main_loss,
        main_logits=None,
        heads=None,
        head_logits=None,
        targets=None,
        frame_lens=None,
        moe_loss=None,
        main_tokens=None,
    ):
        """Combines every term; returns ``(total, {term: detached value})``.

        Arguments
        ---------
        main_loss : torch.Tensor
            The main output's own loss (e.g. CTC).
        main_logits : torch.Tensor, optional
            ``[B, T, V]`` main output logits (needed for label interpolation).
        heads : AuxiliaryHeads, optional
            The auxiliary heads.
        head_logits : dict, optional
            Their logits, from ``heads(tapped_layers)``.
        targets : dict of str to UnitTargets, optional
            Batch fields by unit type.
        frame_lens : torch.Tensor, optional
            ``[B]`` relative frame lengths.
        moe_loss : torch.Tensor, optional
            Sum of the model's MoE auxiliary losses.
        main_tokens : tuple, optional
            ``(tokens, relative lengths)`` the main output's CTC loss uses; see
            :meth:`frame_positions`.
        """
        terms = {}
        if self.uses_label_interpolation:
            if main_logits is None or targets is None or self.main_unit_type not in targets:
                raise ValueError(
                    "Label interpolation needs the main logits and the main unit type's "
                    f"('{self.main_unit_type}') alignment in the batch."
                )
            target = targets[self.main_unit_type]
            if self.label_interpolation > 0 and target.teacher is None:
                raise ValueError(
                    f"Label interpolation with lambda={self.label_interpolation} needs a "
                    f"teacher for '{self.main_unit_type}' in the batch."
                )
            terms["li_main"] = (
                self.label_interpolation_weight,
                label_interpolation_loss(
                    main_logits,
                    target.units,
                    self.frame_positions(main_logits, target, frame_lens, main_tokens),
                    target.teacher,
                    self.label_interpolation,
                    lengths=frame_lens,
                    blank_index=self.main_blank_index,
                ),
            )
        if heads is not None and len(heads) > 0:
            terms.update(
                auxiliary_losses(
                    heads, head_logits, targets or {}, frame_lens, self.scale_by_tau_squared
                )
            )
        if moe_loss is not None and self.moe_weight > 0:
            terms["moe"] = (self.moe_weight, moe_loss)
        return combine_losses(main_loss, terms)
