"""A compact on-disk store of per-utterance unit sequences and frame alignments.

One file per split, written as the records come (memory bounded by one utterance, however
large the split). Layout: the magic bytes ``SBKDUNITS2``, little-endian ``int32`` arrays back
to back, a UTF-8 JSON header, then the header's byte offset and length (two little-endian
8-byte integers) and the magic again. The header names what the store was built with
(``lexicon``, ``tokenizer``, ``tree`` hashes, the frame rate, free-form ``meta``) and indexes
every utterance's arrays (``index``) by offset and length. Stores of the first layout
(``SBKDUNITS1``: 8-byte header length and header before the arrays) are read as well.
Reading memory-maps the data, so a store is opened instantly and each utterance is read
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
import tempfile
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from sb_crossmodal_kd.io import atomic_path

MAGIC = b"SBKDUNITS2"
# The first layout (header before the data, so the writer kept every record until close).
MAGIC_V1 = b"SBKDUNITS1"
_FOOTER = struct.Struct("<QQ")  # header offset, header length
HEADER_KEYS = ("lexicon", "tokenizer", "tree")
# Stream prefixes of stores written before the unit types had one name each.
_LEGACY_STREAMS = {"phones": "monophone", "senones": "senone", "subwords": "subword"}


class UnitStoreMismatchError(ValueError):
    """A store was built with another lexicon, tokenizer, tree or frame rate."""


class UnitStoreWriter:
    """Writes a store record by record; the file appears (atomically) on :meth:`close`.

    Each :meth:`add` appends the utterance's arrays to a temporary file next to ``path`` and
    its index entry to an unnamed temporary file, so memory stays bounded by one utterance; the
    index joins the file at the end. Leaving the ``with`` block by an exception removes both
    and writes nothing.

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
        if "index" in self.header:
            raise ValueError(f"{self.path}: 'index' is the store's own header key")
        self._ids = set()
        self._offset = 0
        self._files = ExitStack()
        tmp = self._files.enter_context(atomic_path(self.path))
        self._data = self._files.enter_context(open(tmp, "wb"))
        self._index = self._files.enter_context(tempfile.TemporaryFile(
            "w+", encoding="utf-8", dir=self.path.parent, prefix=f".{self.path.name}.index."))
        self._data.write(MAGIC)

    def add(self, utterance_id, streams):
        """Appends one utterance: stream name -> 1-D integer array."""
        if utterance_id in self._ids:
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
        spans = {}
        for name, array in arrays.items():
            spans[name] = [self._offset, int(array.size)]
            self._offset += int(array.size)
            self._data.write(array.tobytes())
        # One index entry per line, already in the JSON the header will hold.
        self._index.write(f"{json.dumps(utterance_id)}: {json.dumps(spans)}\n")
        self._ids.add(utterance_id)

    def close(self):
        """Appends the header (with the index) and the footer, then renames the file into place."""
        header = json.dumps(self.header)
        # The header's JSON with the index as its last key, as json.dumps would write it.
        head = (header[:-1] + ", " if len(header) > 2 else "{") + '"index": {'
        start = len(MAGIC) + 4 * self._offset
        length = 0
        for piece in self._header_pieces(head):
            data = piece.encode("utf-8")
            self._data.write(data)
            length += len(data)
        self._data.write(_FOOTER.pack(start, length) + MAGIC)
        self._data.close()
        self._files.close()  # renames the data into place, drops the index's temporary file

    def _header_pieces(self, head):
        yield head
        self._index.seek(0)
        for n, line in enumerate(self._index):
            yield (", " if n else "") + line[:-1]
        yield "}}"

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self._files.__exit__(exc_type, exc, tb)


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
            if magic == MAGIC:
                f.seek(-(_FOOTER.size + len(MAGIC)), os.SEEK_END)
                footer = f.read()
                if footer[_FOOTER.size:] != MAGIC:
                    raise ValueError(f"{self.path} is an incomplete unit store; rebuild it")
                start, length = _FOOTER.unpack(footer[:_FOOTER.size])
                f.seek(start)
                self._data_offset, self._data_size = len(MAGIC), start - len(MAGIC)
            elif magic == MAGIC_V1:
                (length,) = struct.unpack("<Q", f.read(8))
                self._data_offset = len(MAGIC_V1) + 8 + length
                self._data_size = os.path.getsize(self.path) - self._data_offset
            else:
                raise ValueError(f"{self.path} is not a unit store written by UnitStoreWriter")
            self.header = json.loads(f.read(length).decode("utf-8"))
        self._index = {utt: {_current_name(name): span for name, span in streams.items()}
                       for utt, streams in self.header.pop("index").items()}
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
            size = self._data_size
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
