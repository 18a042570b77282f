"""One shard of a split's phone alignments on disk: a header, one line per utterance, an end mark.

A shard file holds the forced alignments of a contiguous range of manifest rows as JSON
lines:

1. the header: ``format``, ``settings`` (a hash of the lexicon, the aligner file and the
   transcript column), ``shard`` (its index), ``rows`` (``[start, stop)`` of the manifest)
   and ``rows_digest`` (a hash of those rows' ID, audio path and transcript);
2. one line per aligned utterance, in manifest order: ``id``, ``phones``,
   ``feature_positions``, ``words``, ``phone_segments`` (the fields of
   :func:`~sb_crossmodal_kd.alignment.corpus.save_alignments`);
3. the end mark: ``{"complete": true, "aligned": n, "skipped": [[id, reason], ...],
   "audio_s": seconds}``.

It is written line by line to a temporary file and renamed into place at the end (memory:
one utterance), so a shard file is complete or absent; :func:`shard_problem` also finds one
cut short or built from other settings or rows, which is then rebuilt, never mixed in.

Example
-------
>>> folder = getfixture("tmp_path")
>>> header = shard_header("s1", 0, 0, [{"ID": "u1", "wav": "u1.wav", "wrd": "a"}])
>>> with ShardWriter(folder / "shard.jsonl", header) as shard:
...     shard.add("u1", {"phones": ["AH0"], "feature_positions": [-1, 0], "words": [],
...                      "phone_segments": []})
...     shard.finish(skipped=[], audio_s=0.02)
>>> shard_problem(folder / "shard.jsonl", header) is None
True
>>> shard_problem(folder / "shard.jsonl", dict(header, settings="s2"))
'built with other settings'
>>> read_shard(folder / "shard.jsonl")["u1"]["feature_positions"]
[-1, 0]
"""

import hashlib
import json
from contextlib import ExitStack

from sb_crossmodal_kd.io import atomic_path

SHARD_FORMAT = "sbkd-phone-alignment-shard-1"
RECORD_FIELDS = ("phones", "feature_positions", "words", "phone_segments")

__all__ = ["SHARD_FORMAT", "ShardWriter", "read_shard", "read_shard_end", "shard_header",
           "shard_problem"]


def shard_header(settings, index, start, rows, text_key="wrd"):
    """The header a shard of ``rows`` (manifest rows from ``start`` on) must carry."""
    described = [[row["ID"], row["wav"], row[text_key]] for row in rows]
    digest = hashlib.sha256(json.dumps(described).encode("utf-8")).hexdigest()[:16]
    return {"format": SHARD_FORMAT, "settings": settings, "shard": index,
            "rows": [start, start + len(rows)], "rows_digest": digest}


class ShardWriter:
    """Writes one shard file line by line; it appears (atomically) after :meth:`finish`.

    Leaving the ``with`` block without :meth:`finish`, or by an exception, writes nothing.
    """

    def __init__(self, path, header):
        self._files = ExitStack()
        tmp = self._files.enter_context(atomic_path(path))
        self._file = self._files.enter_context(open(tmp, "w", encoding="utf-8"))
        self._file.write(json.dumps(header) + "\n")
        self._aligned = 0
        self._finished = False

    def add(self, utterance_id, record):
        """Appends one utterance's alignment (a dict with :data:`RECORD_FIELDS`)."""
        line = {"id": utterance_id, **{field: record[field] for field in RECORD_FIELDS}}
        self._file.write(json.dumps(line) + "\n")
        self._aligned += 1

    def finish(self, skipped, audio_s):
        """Writes the end mark: the shard is complete."""
        self._file.write(json.dumps({"complete": True, "aligned": self._aligned,
                                     "skipped": [list(s) for s in skipped],
                                     "audio_s": audio_s}) + "\n")
        self._finished = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self._file.close()
        if exc_type is None and not self._finished:
            # Leaving unfinished discards the temporary file, as an exception does.
            exc_type, exc, tb = _Unfinished, _Unfinished(), None
        try:
            self._files.__exit__(exc_type, exc, tb)
        except _Unfinished:
            pass
        return False


class _Unfinished(Exception):
    """A shard writer left without its end mark."""


def _lines(path):
    with open(path, encoding="utf-8") as f:
        yield from f


def read_shard_end(path):
    """The end mark of a shard file, or ``None`` when the file does not end with one."""
    last = None
    for last in _lines(path):  # noqa: B007 - only the last line is wanted
        pass
    try:
        end = json.loads(last) if last is not None else None
    except json.JSONDecodeError:
        return None
    return end if isinstance(end, dict) and end.get("complete") is True else None


def shard_problem(path, header):
    """Why the shard file at ``path`` cannot be used as the shard ``header`` describes, or
    ``None`` when it can (present, same header, every line whole, the end mark there)."""
    if not path.is_file():
        return "missing"
    lines = _lines(path)
    try:
        found = json.loads(next(lines))
        count = 0
        for line in lines:
            entry = json.loads(line)
            if entry.get("complete") is True:
                break
            count += 1
        else:
            return "incomplete"
    except (StopIteration, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return "incomplete"
    if not isinstance(found, dict) or found.get("format") != SHARD_FORMAT:
        return "not a phone alignment shard"
    if found.get("settings") != header["settings"]:
        return "built with other settings"
    if found != header:
        return "built from other manifest rows"
    if entry.get("aligned") != count or next(lines, None) is not None:
        return "incomplete"
    return None


def read_shard(path):
    """``{ID: record}`` of one shard file (one shard in memory)."""
    records = {}
    lines = _lines(path)
    next(lines)
    for line in lines:
        entry = json.loads(line)
        if entry.get("complete") is True:
            break
        records[entry.pop("id")] = entry
    return records
