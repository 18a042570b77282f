"""The KD recipe's data hook: units and teachers for the train split of a prepared folder.

:func:`add_kd_items` is the KD recipe's ``dataset_pipelines`` hook: it keeps, in every
condition, the train utterances the unit store holds, and gives them the unit sequences,
alignments and teacher triples that the chosen heads and label interpolation need (nothing
for conditions that need none). With ``n_train_utterances`` it keeps only the first that many
of them in manifest order (:func:`first_utterances`): the same subset in every condition and
seed, for studies of how much paired data the distillation needs.
"""

import hashlib
import logging

logger = logging.getLogger(__name__)

__all__ = ["add_kd_items", "first_utterances", "kd_unit_types", "teacher_unit_types",
           "train_set_summary"]


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


def first_utterances(dataset, n):
    """The first ``n`` utterances of ``dataset`` in manifest order, in ``dataset``'s own order.

    The manifest order is that of the file the dataset was read from (its ``data``, which a
    filtered or sorted view shares), so the subset is the same whatever the view's order
    (e.g. sorted by duration) and seed. ``n`` None: the whole dataset.

    Example
    -------
    >>> from speechbrain.dataio.dataset import DynamicItemDataset
    >>> data = DynamicItemDataset({"a": {"duration": 3.0}, "b": {"duration": 1.0},
    ...                            "c": {"duration": 2.0}})
    >>> by_duration = data.filtered_sorted(sort_key="duration")
    >>> by_duration.data_ids
    ['b', 'c', 'a']
    >>> first_utterances(by_duration, 2).data_ids
    ['b', 'a']
    >>> first_utterances(by_duration, 4)
    Traceback (most recent call last):
    ...
    ValueError: n_train_utterances is 4, but the train set has only 3 utterances
    """
    if n is None:
        return dataset
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n_train_utterances must be a positive integer or null, got {n!r}")
    present = set(dataset.data_ids)
    if n > len(present):
        raise ValueError(f"n_train_utterances is {n}, but the train set has only "
                         f"{len(present)} utterances")
    chosen = set([utt_id for utt_id in dataset.data if utt_id in present][:n])
    return dataset.filtered_sorted(key_test={"id": lambda utt_id: utt_id in chosen})


def train_set_summary(dataset):
    """Utterances, hours and a digest of the sorted IDs of ``dataset`` (what was trained on).

    Example
    -------
    >>> from speechbrain.dataio.dataset import DynamicItemDataset
    >>> summary = train_set_summary(DynamicItemDataset({"a": {"duration": 1800.0},
    ...                                                 "b": {"duration": "1800"}}))
    >>> summary["utterances"], summary["hours"], len(summary["ids_sha1"])
    (2, 1.0, 12)
    """
    ids = list(dataset.data_ids)
    seconds = sum(float(dataset.data[utt_id]["duration"]) for utt_id in ids)
    digest = hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:12]
    return {"utterances": len(ids), "hours": round(seconds / 3600, 4), "ids_sha1": digest}


def _limit_train(datasets, hparams):
    """Keeps the first ``hparams["n_train_utterances"]`` train utterances and logs the set."""
    limit = hparams.get("n_train_utterances")
    before = len(datasets["train"])
    datasets["train"] = first_utterances(datasets["train"], limit)
    summary = train_set_summary(datasets["train"])
    logger.info("train set: %d utterances (%s), %.3f h, ids sha1 %s", summary["utterances"],
                "all" if limit is None else f"the first {limit} of {before} in manifest order",
                summary["hours"], summary["ids_sha1"])


def add_kd_items(datasets, hparams):
    """The KD recipe's ``dataset_pipelines`` hook (called by ``experiment.asr_datasets``).

    With a unit store (``hparams["unit_stores"]["train"]``), every condition, the AM alone
    included, trains only on the utterances the store holds (the aligner may refuse some),
    so all conditions of a study see the same train set; how many were left out is logged.
    With ``hparams["n_train_utterances"]`` (null: all) only the first that many of those in
    manifest order are kept (:func:`first_utterances`); the train set's size, hours and ID
    digest are logged.
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
        _limit_train(datasets, hparams)
        return
    store = UnitStore(store_path)
    train = datasets["train"]
    kept = train.filtered_sorted(key_test={"id": lambda utt_id: utt_id in store})
    if len(kept) < len(train):
        logger.warning("%d of %d train utterances have no units in %s (not aligned): left out "
                       "of training, in every condition", len(train) - len(kept), len(train),
                       store.path)
    datasets["train"] = kept
    _limit_train(datasets, hparams)
    kept = datasets["train"]
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
