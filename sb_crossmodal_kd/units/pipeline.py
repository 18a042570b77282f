"""SpeechBrain data pipelines giving each utterance its unit sequences and frame alignments.

:func:`add_unit_pipelines` adds dynamic items to SpeechBrain ``DynamicItemDataset`` s, read
lazily from a :class:`~sb_crossmodal_kd.units.store.UnitStore`; for each unit type ``u`` of
:mod:`sb_crossmodal_kd.units.types` (``subword``, ``monophone``, ``senone``, ...):

- ``u_units``: ``LongTensor (K,)``, the unit sequence;
- ``u_frame_to_position``: ``LongTensor (T_enc,)``, position per encoder frame, ``-1`` where no
  unit;
- ``u_frame_labels``: ``LongTensor (T_enc,)``, unit id per encoder frame (silence units where
  the unit type has them, as monophones and senones do; ``-1`` elsewhere, as for subwords).

``T_enc`` is checked against the audio (``FrameRate.frames_for_samples`` of the wav's length):
an alignment longer or shorter than its audio by more than ``tolerance`` frames raises
:class:`~sb_crossmodal_kd.alignment.framerate.AlignmentLengthError` naming the utterance; a
smaller difference is padded or trimmed, so frame tensors always match the encoder output.

Collate with :func:`unit_collate` (SpeechBrain's ``PaddedBatch`` with ``-1`` padding for every
registered unit type's frame keys, ``0`` elsewhere), e.g. ``make_dataloader(dataset, collate_fn=unit_collate(...))``
or in a Brain's ``train_loader_kwargs: {collate_fn: ...}``.

Example
-------
>>> import numpy as np, soundfile, speechbrain as sb
>>> from sb_crossmodal_kd.units.store import UnitStoreWriter
>>> folder = getfixture("tmp_path")
>>> soundfile.write(folder / "a.wav", np.zeros(3200), 16000)  # 0.2 s: 6 encoder frames
>>> with UnitStoreWriter(folder / "u.units", {"lexicon": "l", "tokenizer": None, "tree": None}) as w:
...     w.add("a", {"monophone.units": [4, 7],
...                 "monophone.frame_to_position": [-1, 0, 0, 1, 1, -1],
...                 "monophone.frame_labels": [0, 4, 4, 7, 7, 0]})
>>> data = sb.dataio.dataset.DynamicItemDataset({"a": {"wav": str(folder / "a.wav")}})
>>> add_unit_pipelines([data], [folder / "u.units"], unit_types=["monophone"])
>>> data.set_output_keys(["id", "monophone_units", "monophone_frame_to_position"])
>>> batch = unit_collate()([data[0]])
>>> batch.monophone_frame_to_position.data
tensor([[-1,  0,  0,  1,  1, -1]])
"""

import functools

import numpy as np
import torch
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.utils.data_pipeline import provides, takes

from sb_crossmodal_kd.alignment.framerate import ENCODER_FRAME_TOLERANCE, FrameRate, fit_to_length
from sb_crossmodal_kd.data.audio import audio_samples
from sb_crossmodal_kd.units.store import UnitStore
from sb_crossmodal_kd.units.types import STREAM_FIELDS as FIELDS
from sb_crossmodal_kd.units.types import unit_type, unit_type_names


def unit_keys(unit_types):
    """Dynamic item names provided for ``unit_types``."""
    return [f"{u}_{f}" for u in unit_types for f in FIELDS]


def unit_collate(unit_types=None, **kwargs):
    """A ``PaddedBatch`` collate function padding frame keys with ``-1`` (no unit).

    ``unit_types`` defaults to every registered one (when the function is made).
    """
    names = unit_type_names() if unit_types is None else [unit_type(u).name for u in unit_types]
    padding = {f"{u}_{f}": {"value": -1} for u in names for f in FIELDS[1:]}
    return functools.partial(PaddedBatch, per_key_padding_kwargs=padding, **kwargs)


def add_unit_pipelines(
    datasets,
    stores,
    unit_types=None,
    expect=None,
    frame_rate=None,
    tolerance=ENCODER_FRAME_TOLERANCE,
    wav_key="wav",
):
    """Adds unit dynamic items to each dataset, reading its split's store.

    Arguments
    ---------
    datasets : list of DynamicItemDataset
    stores : list of str, Path or UnitStore
        One store per dataset (same order).
    unit_types : list of str, optional
        Unit types to provide (default: every registered one).
    expect : dict, optional
        Hashes in use (``lexicon``, ``tokenizer``, ``tree``); a store built with others is
        refused.
    frame_rate : FrameRate, optional
        Front-end geometry (default 16 kHz, 10 ms, two stride-2 blocks).
    tolerance : int
        Largest accepted difference, in encoder frames, between an alignment and its audio.
    wav_key : str
        Dataset key holding the wav path (its length is read from the file header).
    """
    frame_rate = frame_rate or FrameRate()
    unit_types = unit_type_names() if unit_types is None else list(unit_types)
    for unit in unit_types:
        unit_type(unit)  # an unknown name lists the registered ones
    if len(datasets) != len(stores):
        raise ValueError(f"add_unit_pipelines: {len(datasets)} datasets but {len(stores)} stores")
    for dataset, store in zip(datasets, stores, strict=True):
        if not isinstance(store, UnitStore):
            store = UnitStore(store, expect=expect)
        elif expect:
            store.check(expect)
        for unit in unit_types:
            if store.ids() and f"{unit}.units" not in store[store.ids()[0]]:
                raise ValueError(
                    f"unit store {store.path} has no {unit!r} streams; rebuild it with "
                    f"`sbkd export-units` including {unit}"
                )
        dataset.add_dynamic_item(_pipeline(store, tuple(unit_types), frame_rate, tolerance, wav_key))


def _pipeline(store, unit_types, frame_rate, tolerance, wav_key):
    # An utterance's fields are the same every epoch: made once (header read, frames fitted)
    # and kept; the collate function copies them into each batch, never changes them.
    made = {}
    # Padded frames past the alignment: no unit (-1), or the edge's silence label.
    labels_silence = {unit: unit_type(unit).labels_silence for unit in unit_types}

    def fields(utterance_id, wav):
        record = store[utterance_id]
        n_frames = frame_rate.frames_for_samples(audio_samples(wav, frame_rate.sample_rate))
        for unit in unit_types:
            yield torch.as_tensor(record[f"{unit}.units"], dtype=torch.long)
            for field in FIELDS[1:]:
                values = fit_to_length(
                    record[f"{unit}.{field}"], n_frames, tolerance, utterance_id,
                    fill=None if field == "frame_labels" and labels_silence[unit] else -1,
                )
                yield torch.as_tensor(np.asarray(values), dtype=torch.long)

    @takes("id", wav_key)
    @provides(*unit_keys(unit_types))
    def units_pipeline(utterance_id, wav):
        if utterance_id not in made:
            made[utterance_id] = tuple(fields(utterance_id, wav))
        yield from made[utterance_id]

    return units_pipeline
