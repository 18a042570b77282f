"""The KD recipe's data hook: units and teachers for the train split of a prepared folder.

:func:`add_kd_items` is the KD recipe's ``dataset_pipelines`` hook: it keeps, in every
condition, the train utterances the unit store holds, and gives them the unit sequences,
alignments and teacher triples that the chosen heads and label interpolation need (nothing
for conditions that need none).
"""

import logging

logger = logging.getLogger(__name__)

__all__ = ["add_kd_items", "kd_unit_types", "teacher_unit_types"]


def _objective(hparams):
    """The condition's objective, or the default the Brain uses without one."""
    from sb_crossmodal_kd.losses import DistillationObjective

    return hparams.get("distillation") or DistillationObjective()


def kd_unit_types(hparams):
    """Unit types the condition's heads and label interpolation read (sorted)."""
    return _objective(hparams).required_unit_types(hparams["modules"].get("auxiliary_heads"))


def teacher_unit_types(hparams):
    """Unit types whose teacher cache the condition reads (sorted; empty: no teacher)."""
    return _objective(hparams).teacher_unit_types(hparams["modules"].get("auxiliary_heads"))


def add_kd_items(datasets, hparams):
    """The KD recipe's ``dataset_pipelines`` hook (called by ``experiment.asr_datasets``).

    With a unit store (``hparams["unit_stores"]["train"]``), every condition, the AM alone
    included, trains only on the utterances the store holds (the aligner may refuse some),
    so all conditions of a study see the same train set; how many were left out is logged.
    Then, for every unit type in :func:`kd_unit_types`, ``datasets["train"]`` gets the units
    pipeline (sequences and frame alignments from the store), and for those whose teacher
    the objective reads
    (:meth:`~sb_crossmodal_kd.losses.DistillationObjective.teacher_unit_types`: heads with
    ``alpha > 0``, label interpolation with ``lambda > 0``) the teacher triples of
    ``hparams["teacher_caches"]``. Only those caches are opened: an entry is a
    :class:`~sb_crossmodal_kd.teachers.cache.TeacherCache` or a callable that opens one
    (``base.yaml``'s ``!name:`` entries), and an opened one replaces its entry in
    ``hparams``, where the Brain finds it. A head whose ``tau`` differs from its cache's
    temperature is refused here, before training
    (:func:`~sb_crossmodal_kd.kd_brain.check_teacher_temperatures`). Valid and test stay
    plain: evaluation is the AM alone.
    """
    from sb_crossmodal_kd.kd_brain import check_teacher_temperatures, teacher_items
    from sb_crossmodal_kd.units.pipeline import add_unit_pipelines, unit_keys
    from sb_crossmodal_kd.units.store import UnitStore

    heads = hparams["modules"].get("auxiliary_heads")
    objective = _objective(hparams)
    unit_types = objective.required_unit_types(heads)
    store_path = (hparams.get("unit_stores") or {}).get("train")
    if store_path is None:
        if unit_types:
            raise KeyError(
                f"The condition reads {unit_types} units but hparams has no unit_stores: "
                "{train: ...} (the train split's unit store, e.g. PREP/units/train.units): "
                "add it, or drop the heads / label interpolation that need units"
            )
        return
    store = UnitStore(store_path)
    train = datasets["train"]
    kept = train.filtered_sorted(key_test={"id": lambda utt_id: utt_id in store})
    if len(kept) < len(train):
        logger.warning("%d of %d train utterances have no units in %s (not aligned): left out "
                       "of training, in every condition", len(train) - len(kept), len(train),
                       store.path)
    datasets["train"] = kept
    if not unit_types:
        return
    add_unit_pipelines([kept], [store], unit_types=unit_types)
    teacher_units = objective.teacher_unit_types(heads)
    caches = hparams.get("teacher_caches") or {}
    missing = [unit for unit in teacher_units if unit not in caches]
    if missing:
        raise KeyError(f"hparams teacher_caches has no cache for {missing}: the heads with "
                       "alpha > 0 or label interpolation with lambda > 0 distill from them")
    for unit in teacher_units:
        if callable(caches[unit]):  # a factory (base.yaml's !name:): open it now
            caches[unit] = caches[unit]()
    opened = {unit: caches[unit] for unit in teacher_units}
    check_teacher_temperatures(heads, opened)
    items, teacher_keys = teacher_items(opened)
    for item in items:
        kept.add_dynamic_item(item)
    # Keep the keys the split already gives (sig, or feats when features are cached).
    kept.set_output_keys([*kept.pipeline.output_mapping, *unit_keys(unit_types), *teacher_keys])
