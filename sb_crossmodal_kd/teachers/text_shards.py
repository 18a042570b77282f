"""The unit LMs' text as unit ids, converted shard by shard and kept on disk.

A text file (one sentence per line) is cut into shards of ``shard_size`` consecutive lines
(:func:`~sb_crossmodal_kd.sharding.shard_ranges`: the layout depends on the number of lines
and the shard size only). The shards still to do are converted by ``text_units`` through
:func:`~sb_crossmodal_kd.sharding.shard_results`: in this process (``jobs=1``), in ``jobs``
spawned processes, and under ``torchrun`` each rank the shards ``i % world_size == rank``.
Whoever converts a shard writes its two files, the teacher caches' convention
(:func:`~sb_crossmodal_kd.sharding.write_shard_files`)::

    shard_00000.bin    ends int64 [S] (units up to each sentence's end) | units int32 [U]
    shard_00000.json   what it was made from: format, the text's sha256, bytes and lines,
                       unit_type, units_hash, vocab_size, shard_size; the shard's index and
                       lines [start, stop); sentences S, units U, skipped_oov (sentences with
                       out-of-vocabulary words), first_skipped; the .bin's bytes and sha256

Rank 0 alone decides what is to do (:func:`~sb_crossmodal_kd.distributed.main_decides`): it
reads the text once (its sha256 and where each shard's lines start) and keeps a shard whose
files are intact and whose ``.json`` records the same settings and lines; a shard missing,
cut short or made from another text, other units or another shard size is converted again,
never mixed in. Shard files outside the layout (from a longer text) and temporary files are
removed. The folder is the same bytes whatever ``jobs`` and the number of ranks are.

Memory: a worker holds one shard's sentences; the caller receives small summaries and reads
the sequences from the shards as it needs them (:class:`TextShards`, memory-mapped).

Example
-------
>>> from sb_crossmodal_kd.units.lexicon import Lexicon
>>> from sb_crossmodal_kd.units.types import TextUnits
>>> units = TextUnits("monophone", lexicon=Lexicon({"turn": [["T", "ER1", "N"]],
...                                                 "on": [["AA1", "N"]]}, name="toy"))
>>> text = getfixture("tmp_path") / "lm.txt"
>>> _ = text.write_text("turn on\\nturn\\nturn off\\n\\non\\n")
>>> sequences, skipped = convert_sharded(text, units, text.parent / "units", shard_size=2)
>>> sequences, skipped
([[31, 12, 23, 1, 23], [31, 12, 23], [1, 23]], 1)
>>> sorted(p.name for p in (text.parent / "units").iterdir())[:2]
['shard_00000.bin', 'shard_00000.json']
"""

import functools
import hashlib
import itertools
import json
import logging
import os
import pickle
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sb_crossmodal_kd.distributed import main_decides
from sb_crossmodal_kd.sharding import (
    check_jobs,
    read_shard_info,
    shard_name,
    shard_ranges,
    shard_results,
    write_shard_files,
)
from sb_crossmodal_kd.units.lexicon import OutOfVocabularyError

__all__ = ["FORMAT", "SHARD_SIZE", "TextShards", "convert_lines", "convert_sharded",
           "convert_to_shards", "read_text_shard"]

logger = logging.getLogger(__name__)

FORMAT = "sb-crossmodal-kd unit text v1"
# Lines per shard: a fixed layout (the output does not depend on the number of processes);
# tens of thousands of sentences take seconds to convert, so a worker's start-up and the
# pickled converter are a small part of its work, and one shard's ids are a few MB.
SHARD_SIZE = 50_000


def convert_lines(path, text_units, offset=0, first_line=0, n_lines=None):
    """Unit sequences of ``n_lines`` lines of ``path`` (all when ``None``) from byte
    ``offset``, which is where line ``first_line`` (0-based) starts.

    Blank lines give nothing; a sentence with out-of-vocabulary words is skipped and counted;
    one whose conversion is empty is dropped. Lines end at ``\\n`` (a ``\\r`` before it is
    stripped with the other surrounding white space).

    Returns
    -------
    sequences : list of list of int
    skipped : int
        Sentences skipped for out-of-vocabulary words.
    first_skipped : str or None
        The first of those errors (naming ``<file name>:<line number>``).

    Example
    -------
    >>> from sb_crossmodal_kd.units.lexicon import Lexicon
    >>> from sb_crossmodal_kd.units.types import TextUnits
    >>> units = TextUnits("monophone", lexicon=Lexicon({"on": [["AA1", "N"]]}, name="toy"))
    >>> text = getfixture("tmp_path") / "lm.txt"
    >>> _ = text.write_text("on\\noff on\\n")
    >>> sequences, skipped, first = convert_lines(text, units)
    >>> sequences, skipped, "lm.txt:2" in first
    ([[1, 23]], 1, True)
    """
    sequences, skipped, first_skipped = [], 0, None
    name = os.path.basename(path)
    with open(path, "rb") as handle:
        handle.seek(offset)
        for number, raw in enumerate(itertools.islice(handle, n_lines), first_line + 1):
            text = raw.decode("utf-8").strip()
            if not text:
                continue
            try:
                units = text_units(text, utterance_id=f"{name}:{number}")
            except OutOfVocabularyError as error:
                skipped += 1
                first_skipped = first_skipped or str(error)
                continue
            if units:
                sequences.append([int(u) for u in units])
    return sequences, skipped, first_skipped


def convert_sharded(path, text_units, folder, jobs=1, shard_size=SHARD_SIZE):
    """Unit sequences of the lines of ``path`` as lists, converted shard by shard into
    ``folder`` (kept there: a later call converts only the shards missing or made otherwise).

    :func:`convert_to_shards` does the same and returns the sequences read from disk as
    needed (:class:`TextShards`), for texts too large for memory; this is its list form.

    Under ``torchrun`` this is a collective (every rank calls it with the same arguments,
    ``folder`` on storage every rank sees) and every rank receives all the sequences.

    Arguments
    ---------
    path : str or Path
        The text, one sentence per line.
    text_units : callable
        ``text_units(text, utterance_id=...) -> list of int`` with ``unit_type``, ``hash`` and
        ``vocab_size`` (a :class:`~sb_crossmodal_kd.units.types.TextUnits`). With ``jobs > 1``
        it is pickled once and unpickled once in each worker process.
    folder : str or Path
        The shard files' folder (created).
    jobs : int
        Processes on this machine (on each rank under ``torchrun``); checked before any work.
    shard_size : int
        Lines per shard.

    Returns
    -------
    sequences : list of list of int
        In the text's order, as :func:`~sb_crossmodal_kd.teachers.lm_training.convert` gives
        them.
    skipped : int
        Sentences skipped for out-of-vocabulary words.

    Raises
    ------
    ValueError
        When no sentence is left (an empty text, or every sentence out of the vocabulary):
        there is nothing to train on.
    """
    sequences, skipped = convert_to_shards(path, text_units, folder, jobs, shard_size)
    return sequences[:], skipped


def convert_to_shards(path, text_units, folder, jobs=1, shard_size=SHARD_SIZE):
    """:func:`convert_sharded` returning ``(TextShards of folder, skipped)``: the sequences
    stay on disk, memory-mapped, whatever the size of the text."""
    check_jobs(jobs)
    shard_ranges(0, shard_size)  # refuses a bad shard size before any work
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: make the corpus with `sbkd corpus` first")
    folder = Path(folder)
    units = {"unit_type": text_units.unit_type, "units_hash": text_units.hash,
             "vocab_size": text_units.vocab_size}
    start = main_decides(_start, path, folder, units, shard_size)
    summaries = dict(start["done"])
    sent = _Pickled(text_units) if jobs > 1 else text_units
    tasks = {i: (path, folder, i, start["offsets"][i], first, stop, sent, start["settings"])
             for i, (first, stop) in enumerate(start["ranges"]) if i not in summaries}
    for i, summary in shard_results(_convert_shard, tasks, jobs):
        summaries[i] = summary
    ordered = [summaries[i] for i in range(len(start["ranges"]))]
    skipped = sum(s["skipped_oov"] for s in ordered)
    first_skipped = next((s["first_skipped"] for s in ordered if s["first_skipped"]), None)
    if skipped:
        logger.warning("%s: skipped %d sentences with OOV words, e.g. %s", path, skipped,
                       first_skipped)
    if not sum(s["sentences"] for s in ordered):
        raise ValueError(f"{path} gives no {text_units.unit_type} sentences ({skipped} skipped "
                         "for out-of-vocabulary words): nothing to train the unit LM on")
    return TextShards(folder, [s["sentences"] for s in ordered]), skipped


class TextShards(Sequence):
    """The unit sequences of a folder of text shards, read from disk as they are asked for.

    Each shard's ``.bin`` is memory-mapped when one of its sentences is read (a few shards
    stay open), so the memory held does not grow with the text: one count per shard, and,
    when asked for, :meth:`lengths` (4 bytes a sentence). A sentence is a list of int; a
    slice is a list of them.

    Arguments
    ---------
    folder : str or Path
        Shards written by :func:`convert_to_shards`.
    sentences : list of int
        Sentences in each shard, in shard order (the shards' ``.json`` record them).
    limit : int, optional
        Only the first ``limit`` sentences (:meth:`first`).

    Example
    -------
    >>> folder = getfixture("tmp_path")
    >>> _ = (folder / "lm.txt").write_text("on\\non on\\non on on\\n")
    >>> from sb_crossmodal_kd.units.lexicon import Lexicon
    >>> from sb_crossmodal_kd.units.types import TextUnits
    >>> units = TextUnits("monophone", lexicon=Lexicon({"on": [["AA1", "N"]]}, name="toy"))
    >>> shards, _ = convert_to_shards(folder / "lm.txt", units, folder / "units", shard_size=2)
    >>> len(shards), shards[1], shards[-1] == shards[2], shards.lengths().tolist()
    (3, [1, 23, 1, 23], True, [2, 4, 6])
    """

    def __init__(self, folder, sentences, limit=None):
        self.folder, self.sentences = Path(folder), list(sentences)
        self._first = np.cumsum([0, *self.sentences], dtype=np.int64)
        total = int(self._first[-1])
        self._len = total if limit is None else min(total, limit)
        self._open = functools.lru_cache(maxsize=8)(self._read)

    def __len__(self):
        return self._len

    def first(self, n):
        """The first ``n`` sentences (all when there are fewer), as a :class:`TextShards`."""
        return TextShards(self.folder, self.sentences, min(n, len(self)))

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"sentence {index} of {len(self)}")
        shard = int(np.searchsorted(self._first, index, side="right")) - 1
        ends, units = self._open(shard)
        local = index - int(self._first[shard])
        start = int(ends[local - 1]) if local else 0
        return units[start:int(ends[local])].tolist()

    def lengths(self):
        """Units in each sentence, in order (int32 [N])."""
        parts = [np.diff(self._open(i)[0], prepend=0).astype(np.int32)
                 for i in range(len(self.sentences)) if self._first[i] < len(self)]
        return (np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32))[:len(self)]

    def _read(self, shard):
        n = int(self._first[shard + 1] - self._first[shard])
        path = self.folder / f"{shard_name(shard)}.bin"
        if n == 0 or path.stat().st_size == 8 * n:  # no sentence, or none with units
            return np.zeros(n, dtype=np.int64), np.zeros(0, dtype=np.int32)
        return (np.memmap(path, dtype=np.int64, mode="r", shape=(n,)),
                np.memmap(path, dtype=np.int32, mode="r", offset=8 * n))


def read_text_shard(folder, index):
    """The unit sequences of shard ``index`` of ``folder`` (as lists of int)."""
    name = shard_name(index)
    info = json.loads((Path(folder) / f"{name}.json").read_text())
    data = (Path(folder) / f"{name}.bin").read_bytes()
    n = info["sentences"]
    ends = np.frombuffer(data, dtype=np.int64, count=n).tolist()
    units = np.frombuffer(data, dtype=np.int32, offset=8 * n).tolist()
    return [units[a:b] for a, b in zip([0, *ends], ends, strict=False)]


def _scan(path, shard_size):
    """The text's sha256, size, number of lines and the byte offset of each shard's first
    line: one pass over the file, memory one line."""
    digest, offsets, position, lines = hashlib.sha256(), [], 0, 0
    with open(path, "rb") as handle:
        for line in handle:
            if lines % shard_size == 0:
                offsets.append(position)
            digest.update(line)
            position += len(line)
            lines += 1
    return {"text_sha256": digest.hexdigest(), "text_bytes": position,
            "text_lines": lines}, offsets


def _start(path, folder, units, shard_size):
    """What is to do (rank 0): the settings, the shards' lines and offsets, and the summaries
    of the shards already done; removes files that have no place in the layout."""
    scanned, offsets = _scan(path, shard_size)
    settings = {"format": FORMAT, **scanned, **units, "shard_size": shard_size}
    ranges = shard_ranges(scanned["text_lines"], shard_size)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".*.tmp"):  # left by an interrupted write
        stale.unlink()
    for extra in folder.glob("shard_*.*"):
        match = re.fullmatch(r"shard_(\d+)\.(bin|json)", extra.name)
        if match and int(match.group(1)) >= len(ranges):
            extra.unlink()
    done = {}
    for i, (first, stop) in enumerate(ranges):
        info = read_shard_info(folder, i)
        wanted = {**settings, "shard": i, "lines": [first, stop]}
        if info is not None and all(info.get(key) == value for key, value in wanted.items()):
            done[i] = _summary(info)
    return {"settings": settings, "ranges": ranges, "offsets": offsets, "done": done}


def _summary(info):
    return {key: info[key] for key in ("sentences", "units", "skipped_oov", "first_skipped")}


class _Pickled:
    """``text_units`` pickled once by the caller (a lexicon with its letter-to-sound table is
    megabytes): each worker process unpickles it once, not once a shard."""

    def __init__(self, obj):
        self.data = pickle.dumps(obj)
        self.key = hashlib.sha256(self.data).hexdigest()


_UNPICKLED = {}


def _text_units(sent):
    if not isinstance(sent, _Pickled):
        return sent
    if sent.key not in _UNPICKLED:
        _UNPICKLED.clear()  # one converter per process at a time
        _UNPICKLED[sent.key] = pickle.loads(sent.data)
    return _UNPICKLED[sent.key]


def _convert_shard(path, folder, index, offset, first, stop, sent, settings):
    """Converts lines ``[first, stop)`` of ``path`` and writes shard ``index``'s files; its
    summary goes back (the sequences stay on disk, nothing large is pickled back)."""
    sequences, skipped, first_skipped = convert_lines(path, _text_units(sent), offset, first,
                                                      stop - first)
    ends = np.cumsum([len(s) for s in sequences], dtype=np.int64)
    units = np.fromiter(itertools.chain.from_iterable(sequences), dtype=np.int32,
                        count=int(ends[-1]) if len(ends) else 0)
    info = {**settings, "shard": index, "lines": [first, stop], "sentences": len(sequences),
            "units": int(units.size), "skipped_oov": skipped, "first_skipped": first_skipped}
    write_shard_files(folder, index, ends.tobytes() + units.tobytes(), info)
    return _summary(info)
