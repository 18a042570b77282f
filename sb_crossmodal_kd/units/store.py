"""A compact on-disk store of per-utterance unit sequences and frame alignments.

One file per split. Layout: the magic bytes ``SBKDUNITS1``, an 8-byte little-endian header
length, a UTF-8 JSON header, then little-endian ``int32`` arrays back to back. The header
names what the store was built with (``lexicon``, ``tokenizer``, ``tree`` hashes, the frame
rate, free-form ``meta``) and indexes every utterance's arrays (``streams``) by offset and
length. Reading memory-maps the data, so a store is opened instantly and each utterance is read
only when asked for.

Stream names used by the package:
``<unit>.units`` (the unit sequence), ``<unit>.frame_to_position`` (position per encoder frame,
``-1`` where no unit), ``<unit>.frame_labels`` (unit id per encoder frame, silence units where
the unit type has them, else ``-1``) for every unit type ``unit`` of
:mod:`sb_crossmodal_kd.units.types` (``subword``, ``monophone``, ``senone``, ...); and
``feature_positions`` (phone position per 10 ms frame, for tree building). Stores written
before the unit types had one name each (streams ``phones.*``, ``senones.*``, ``subwords.*``)
are read under the current names.

Opening with ``expect={"lexicon": ..., "tokenizer": ..., "tree": ...}`` refuses a store built
with anything else, naming the mismatch.

Example
-------
>>> import numpy as np
>>> path = getfixture("tmp_path") / "train.units"
>>> with UnitStoreWriter(path, {"lexicon": "lex:1", "tokenizer": "spm:2", "tree": "tree:3"}) as w:
...     w.add("utt1", {"monophone.units": np.array([5, 9]),
...                    "monophone.frame_to_position": [0, 0, 1]})
>>> store = UnitStore(path, expect={"lexicon": "lex:1", "tree": "tree:3"})
>>> store["utt1"]["monophone.frame_to_position"], len(store), "utt1" in store
(array([0, 0, 1], dtype=int32), 1, True)
>>> UnitStore(path, expect={"tree": "tree:4"})
Traceback (most recent call last):
...
sb_crossmodal_kd.units.store.UnitStoreMismatchError: ...: built with tree 'tree:3', but ...
"""

import json
import os
import struct
from pathlib import Path

import numpy as np

from sb_crossmodal_kd.io import atomic_path

MAGIC = b"SBKDUNITS1"
HEADER_KEYS = ("lexicon", "tokenizer", "tree")
# Stream prefixes of stores written before the unit types had one name each.
_LEGACY_STREAMS = {"phones": "monophone", "senones": "senone", "subwords": "subword"}


class UnitStoreMismatchError(ValueError):
    """A store was built with another lexicon, tokenizer, tree or frame rate."""


class UnitStoreWriter:
    """Collects utterance records and writes the store atomically on :meth:`close`.

    Arguments
    ---------
    path : str or Path
        Output file.
    header : dict
        ``lexicon``, ``tokenizer``, ``tree`` (hashes; ``None`` if not used), optionally
        ``frame_rate`` (a dict) and ``meta`` (anything JSON).
    """

    def __init__(self, path, header):
        self.path = Path(path)
        self.header = dict(header)
        for key in HEADER_KEYS:
            self.header.setdefault(key, None)
        self.records = {}

    def add(self, utterance_id, streams):
        """Adds one utterance: stream name -> 1-D integer array."""
        if utterance_id in self.records:
            raise ValueError(f"{self.path}: utterance {utterance_id!r} added twice")
        arrays = {}
        for name, values in streams.items():
            array = np.asarray(values)
            if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
                raise ValueError(
                    f"{self.path}: utterance {utterance_id!r} stream {name!r} must be a 1-D "
                    f"integer array, got shape {array.shape} dtype {array.dtype}"
                )
            arrays[name] = array.astype("<i4")
        self.records[utterance_id] = arrays

    def close(self):
        """Writes the file (temp file in the same folder, then rename)."""
        index, offset = {}, 0
        for utt, arrays in self.records.items():
            index[utt] = {}
            for name, array in arrays.items():
                index[utt][name] = [offset, int(array.size)]
                offset += int(array.size)
        header = dict(self.header, index=index)
        blob = json.dumps(header).encode("utf-8")
        with atomic_path(self.path) as tmp, open(tmp, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for arrays in self.records.values():
                for array in arrays.values():
                    f.write(array.tobytes())

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()


class UnitStore:
    """Reads a store lazily; ``store[utterance_id]`` -> dict of stream name -> ``int32`` array.

    Arguments
    ---------
    path : str or Path
    expect : dict, optional
        Hashes the caller works with (``lexicon``, ``tokenizer``, ``tree``; ``None`` values
        are not checked) and optionally ``frame_rate`` (a dict); any difference raises
        :class:`UnitStoreMismatchError` naming it.
    """

    def __init__(self, path, expect=None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"unit store {self.path} not found; build it with `sbkd export-units`"
            )
        with open(self.path, "rb") as f:
            magic = f.read(len(MAGIC))
            if magic != MAGIC:
                raise ValueError(f"{self.path} is not a unit store written by UnitStoreWriter")
            (length,) = struct.unpack("<Q", f.read(8))
            self.header = json.loads(f.read(length).decode("utf-8"))
        self._index = {utt: {_current_name(name): span for name, span in streams.items()}
                       for utt, streams in self.header.pop("index").items()}
        self._data_offset = len(MAGIC) + 8 + length
        self._data = None
        if expect:
            self.check(expect)

    def check(self, expect):
        """Raises :class:`UnitStoreMismatchError` if the header differs from ``expect``."""
        problems = []
        for key, wanted in expect.items():
            if wanted is None:
                continue
            found = self.header.get(key)
            if found != wanted:
                problems.append(f"built with {key} {found!r}, but {wanted!r} is in use")
        if problems:
            raise UnitStoreMismatchError(
                f"unit store {self.path}: " + "; ".join(problems) + ". Rebuild it with "
                "`sbkd export-units` using the current lexicon, tokenizer and tree."
            )

    def _array(self):
        if self._data is None:
            size = os.path.getsize(self.path) - self._data_offset
            self._data = np.memmap(
                self.path, dtype="<i4", mode="r", offset=self._data_offset, shape=(size // 4,)
            ) if size > 0 else np.zeros(0, dtype="<i4")
        return self._data

    def __getitem__(self, utterance_id):
        if utterance_id not in self._index:
            raise KeyError(
                f"utterance {utterance_id!r} is not in unit store {self.path} "
                f"({len(self._index)} utterances); was it skipped when the store was built?"
            )
        data = self._array()
        return {
            name: np.array(data[offset : offset + length], dtype=np.int32)
            for name, (offset, length) in self._index[utterance_id].items()
        }

    def __contains__(self, utterance_id):
        return utterance_id in self._index

    def __len__(self):
        return len(self._index)

    def ids(self):
        """Utterance IDs in the order they were written."""
        return list(self._index)


def _current_name(stream):
    unit, dot, field = stream.partition(".")
    return f"{_LEGACY_STREAMS[unit]}.{field}" if dot and unit in _LEGACY_STREAMS else stream
