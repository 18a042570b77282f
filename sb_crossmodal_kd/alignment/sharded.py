"""The corpus steps of a split run shard by shard: alignment, tree statistics, unit store.

A split's manifest rows are cut into shards of :data:`SHARD_SIZE` rows
(:func:`~sb_crossmodal_kd.sharding.shard_ranges`); each shard is aligned by a worker
(``jobs`` processes, or the ranks of a ``torchrun``: :func:`~sb_crossmodal_kd.sharding.shard_results`)
into its own file (:mod:`~sb_crossmodal_kd.alignment.shard_files`), kept when a re-run finds
it complete and built from the same settings and rows, rebuilt otherwise. What consumes the
alignments reads them one shard at a time, in shard order:

- :func:`align_split`: the shard files in ``folder``, optionally merged into the one-document
  file of :func:`~sb_crossmodal_kd.alignment.corpus.save_alignments` (streamed, the same bytes
  whoever aligned the shards);
- :func:`open_shards`: a shards folder written earlier (``sbkd align``'s
  ``OUTPUT/<name>_shards/``), every shard checked against the manifest and the aligner before
  any work, for ``sbkd build-tree --shards`` and ``sbkd export-units --shards``;
- :func:`split_tree_statistics`: each shard's triphone statistics, added in shard order;
- :func:`export_split_units`: each shard's unit store part, appended in shard order to the
  split's store, the same bytes as :func:`~sb_crossmodal_kd.alignment.corpus.export_units`
  of all rows.

Memory is bounded by a round of shards (``jobs`` per rank), whatever the split's size. Under
``torchrun`` rank 0 writes the merged files; the others wait for it.

Example
-------
>>> SHARD_SIZE, shard_path("align/train_shards", 3).name
(256, 'shard-00003.jsonl')
"""

import functools
import hashlib
import json
import logging
import time
from contextlib import ExitStack
from pathlib import Path

from sb_crossmodal_kd.alignment.corpus import (
    ALIGNMENTS_FORMAT,
    accumulate_tree_statistics,
    align_manifest,
    alignment_record,
    export_units,
    read_manifest,
    unit_store_header,
)
from sb_crossmodal_kd.alignment.shard_files import (
    ShardWriter,
    read_shard,
    read_shard_end,
    shard_header,
    shard_problem,
)
from sb_crossmodal_kd.distributed import rank, rank_device
from sb_crossmodal_kd.io import atomic_path
from sb_crossmodal_kd.sharding import check_jobs, shard_ranges, shard_results

logger = logging.getLogger(__name__)

__all__ = ["SHARD_SIZE", "ShardedAlignments", "align_split", "export_split_units",
           "import_alignments_document", "open_shards", "split_tree_statistics",
           "write_alignments_document"]

# Rows per shard: a fixed layout (results do not depend on the number of processes), small
# enough that one shard's alignments are a few MB, large enough that a worker's start-up
# (loading the aligner) is a small part of its work.
SHARD_SIZE = 256


@functools.lru_cache(maxsize=2)
def _lexicon(lexicon_file, oov_policy):
    from sb_crossmodal_kd.units.lexicon import Lexicon

    return Lexicon.load(lexicon_file, oov_policy=oov_policy)


@functools.lru_cache(maxsize=2)
def _aligner(aligner_path, lexicon_file, oov_policy, device="cpu"):
    from sb_crossmodal_kd.alignment.forced import PhoneAligner

    return PhoneAligner.load(aligner_path, _lexicon(lexicon_file, oov_policy), device)


def alignment_settings(lexicon_hash, aligner_path, text_key="wrd"):
    """The hash every shard of one alignment run carries: lexicon, aligner (its settings and
    weights), text column."""
    aligner = _aligner_digest(aligner_path)
    described = json.dumps({"lexicon": lexicon_hash, "aligner": aligner, "text_key": text_key},
                           sort_keys=True)
    return hashlib.sha256(described.encode("utf-8")).hexdigest()[:16]


def _aligner_digest(path):
    """A hash of a saved aligner's content (the file's own bytes also hold its temporary
    name, so two saves of one model differ)."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=False)
    digest = hashlib.sha256(json.dumps(
        {"settings": state["settings"], "lexicon": state["lexicon"]}, sort_keys=True).encode())
    for name, tensor in [*sorted(state["model"].items()), ("log_prior", state["log_prior"])]:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class ShardedAlignments:
    """A split's aligned shards, read one at a time.

    ``get(ID)`` answers as a dict of records would (what
    :func:`~sb_crossmodal_kd.alignment.corpus.tree_statistics` and
    :func:`~sb_crossmodal_kd.alignment.corpus.export_units` read), holding the one shard it
    last read; :meth:`shard` gives one shard's records.
    """

    def __init__(self, folder, ids, ranges):
        self.paths = [shard_path(folder, i) for i in range(len(ranges))]
        self.ranges = ranges
        self._shard_of = {utt: i for i, (start, stop) in enumerate(ranges)
                          for utt in ids[start:stop]}
        self._held = (None, {})

    def shard(self, index):
        """``{ID: record}`` of shard ``index``."""
        return read_shard(self.paths[index])

    def get(self, utterance_id, default=None):
        index = self._shard_of.get(utterance_id)
        if index is None:
            return default
        if self._held[0] != index:
            self._held = (index, self.shard(index))
        return self._held[1].get(utterance_id, default)


def shard_path(folder, index):
    """The file of shard ``index`` in ``folder``."""
    return Path(folder) / f"shard-{index:05d}.jsonl"


def align_split(aligner_path, manifest, folder, lexicon_file=None, oov_policy="g2p", jobs=1,
                text_key="wrd", document=None, header=None, shard_size=None, device="cpu"):
    """Aligns a manifest shard by shard into ``folder``, keeping the shards already done.

    Arguments
    ---------
    aligner_path : str or Path
        A trained :class:`~sb_crossmodal_kd.alignment.forced.PhoneAligner` file.
    manifest : str or Path
        SpeechBrain CSV manifest (``ID``, ``wav``, ``text_key``).
    folder : str or Path
        Where the shard files go (``shard-00000.jsonl``, ...).
    lexicon_file, oov_policy
        The lexicon the aligner was trained with (``None``: the shipped CMUdict).
    jobs : int
        Processes on this machine (per rank under ``torchrun``).
    document : str or Path, optional
        Also write the alignments as one file (:func:`write_alignments_document`).
    header : dict, optional
        Extra keys of that document's header (e.g. the manifest's path).
    shard_size : int, optional
        Rows per shard (default :data:`SHARD_SIZE`). Alignments and stores do not depend on
        it; the tree statistics' float sums do, in their last bits.
    device : str
        Where the phone model runs (``cuda``: under ``torchrun`` each rank's own GPU; every
        process of ``jobs`` uses it). Features and Viterbi stay on the CPU.

    Returns
    -------
    alignments : ShardedAlignments
    report : dict
        ``{"utterances", "aligned", "skipped", "audio_s"}`` (the same whoever aligned) and
        this run's ``"seconds"``, ``"audio_s_per_s"`` and ``"shards_built"``.
    """
    check_jobs(jobs)
    lexicon = _lexicon(lexicon_file, oov_policy)
    rows = read_manifest(manifest, text_key)
    settings = alignment_settings(lexicon.hash, aligner_path, text_key)
    ranges = shard_ranges(len(rows), shard_size or SHARD_SIZE)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = (str(aligner_path), lexicon_file and str(lexicon_file), oov_policy, text_key,
            rank_device(device))
    tasks = {i: (spec, shard_path(folder, i), shard_header(settings, i, start, rows[start:stop],
                                                           text_key), rows[start:stop])
             for i, (start, stop) in enumerate(ranges)}
    start_time = time.time()
    report = {"utterances": len(rows), "aligned": 0, "skipped": [], "audio_s": 0.0}
    built = 0
    for _, (end, was_built) in shard_results(_align_shard, tasks, jobs):
        report["aligned"] += end["aligned"]
        report["skipped"] += end["skipped"]
        report["audio_s"] += end["audio_s"]
        built += was_built
    report["audio_s"] = round(report["audio_s"], 2)
    alignments = ShardedAlignments(folder, [row["ID"] for row in rows], ranges)
    if document is not None:
        full_header = {**(header or {}), "lexicon": lexicon.hash,
                       "aligner": _aligner(*spec[:3]).state()["settings"], "report": report}
        if built or not _document_has(document, full_header):
            _on_main(write_alignments_document, document, alignments, full_header)
    seconds = time.time() - start_time
    return alignments, {**report, "seconds": round(seconds, 2), "shards_built": built,
                        "audio_s_per_s": round(report["audio_s"] / max(seconds, 1e-9), 2)}


def open_shards(folder, manifest, aligner_path, lexicon_file=None, oov_policy="g2p",
                text_key="wrd"):
    """The shards :func:`align_split` wrote into ``folder``, checked before any work.

    Every shard must be there, complete, and built with this aligner, lexicon and transcript
    column from this manifest's rows; reading a folder checks each file line by line (memory:
    one line). The shard size is read from the first shard's header, so a folder aligned with
    any ``shard_size`` is read as it was cut.

    Arguments
    ---------
    folder : str or Path
        The shards folder (``sbkd align``: ``OUTPUT/<manifest name>_shards/``).
    manifest : str or Path
        The manifest those shards were aligned from.
    aligner_path : str or Path
        The aligner file they were aligned with.
    lexicon_file, oov_policy
        The lexicon of the alignment (``None``: the shipped CMUdict).
    text_key : str
        The transcript column of the alignment.

    Returns
    -------
    ShardedAlignments

    Raises
    ------
    ValueError
        One line naming the first shard that is missing, cut short or from other settings
        (and saying to re-run ``sbkd align``, which rebuilds exactly those shards), or naming
        the manifest when its rows are not the ones the shards were aligned from.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no shards folder there; give the OUTPUT/<name>_shards "
                         "folder that `sbkd align` writes")
    rows = read_manifest(manifest, text_key)
    settings = alignment_settings(_lexicon(lexicon_file and str(lexicon_file), oov_policy).hash,
                                  aligner_path, text_key)
    ranges = shard_ranges(len(rows), _folder_shard_size(folder))
    extra = sorted(path.name for path in folder.glob("shard-*.jsonl")
                   if path.name not in {shard_path(folder, i).name for i in range(len(ranges))})
    if extra:
        raise ValueError(f"{manifest}: its {len(rows)} rows are not the ones {folder} was "
                         f"aligned from ({extra[0]} is beyond them); give that manifest, or "
                         "re-run `sbkd align` with this one")
    for i, (start, stop) in enumerate(ranges):
        _check_shard(shard_path(folder, i), shard_header(settings, i, start, rows[start:stop],
                                                         text_key), manifest)
    return ShardedAlignments(folder, [row["ID"] for row in rows], ranges)


def _folder_shard_size(folder):
    """Rows per shard of a shards folder: the first shard's row count (:data:`SHARD_SIZE`
    when that shard is missing or unreadable; checking it then reports why)."""
    try:
        with open(shard_path(folder, 0), encoding="utf-8") as f:
            start, stop = json.loads(f.readline())["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        return SHARD_SIZE
    if start != 0 or not isinstance(stop, int) or stop < 1:
        return SHARD_SIZE
    return stop


def _check_shard(path, header, manifest):
    """Refuses (one line) the shard at ``path`` unless it is the complete shard ``header``."""
    problem = shard_problem(path, header)
    if problem is None:
        return
    if problem == "built from other manifest rows":
        raise ValueError(f"{manifest}: its rows are not the ones {path} was aligned from; give "
                         "that manifest, or re-run `sbkd align` with this one")
    if problem == "built with other settings":
        problem = "built with another aligner, lexicon or --text-key than given here"
    raise ValueError(f"{path}: {problem}; re-run `sbkd align` with the same settings on the "
                     "same --output, which rebuilds exactly the missing, cut-short or "
                     "other-settings shards")


def _align_shard(spec, path, header, rows):
    """One shard's alignment (a worker's task): ``(end mark, whether it was built now)``."""
    problem = shard_problem(path, header)
    if problem is None:
        return read_shard_end(path), False
    if problem != "missing":
        logger.warning("%s: %s; rebuilding it", path, problem)
    aligner_path, lexicon_file, oov_policy, text_key, device = spec
    aligner = _aligner(aligner_path, lexicon_file, oov_policy, device)
    alignments, report = align_manifest(aligner, rows, text_key, progress=False)
    with ShardWriter(path, header) as shard:
        for utt, alignment in alignments.items():
            shard.add(utt, alignment_record(alignment))
        shard.finish(report["skipped"], report["audio_s"])
    return read_shard_end(path), True


def import_alignments_document(document, manifest, folder, aligner_path, lexicon_file=None,
                               oov_policy="g2p", text_key="wrd", shard_size=None):
    """Cuts a one-document alignment file (what the chain wrote before shards) into the
    shard files :func:`align_split` keeps, so that it aligns nothing again.

    The document is read whole, once (its split was small enough to be written so); each
    shard's ``audio_s`` is its audio files' length.
    """
    from sb_crossmodal_kd.alignment.corpus import load_alignments
    from sb_crossmodal_kd.data.audio import audio_samples

    lexicon = _lexicon(lexicon_file and str(lexicon_file), oov_policy)
    header, records = load_alignments(document, lexicon.hash)
    skipped = dict(header.get("report", {}).get("skipped", []))
    rows = read_manifest(manifest, text_key)
    settings = alignment_settings(lexicon.hash, aligner_path, text_key)
    rate = _aligner(str(aligner_path), lexicon_file and str(lexicon_file),
                    oov_policy).settings.frame_rate.sample_rate
    for i, (start, stop) in enumerate(shard_ranges(len(rows), shard_size or SHARD_SIZE)):
        shard_rows = rows[start:stop]
        with ShardWriter(shard_path(folder, i),
                         shard_header(settings, i, start, shard_rows, text_key)) as shard:
            for row in shard_rows:
                if row["ID"] in records:
                    shard.add(row["ID"], records[row["ID"]])
            seconds = sum(audio_samples(row["wav"], rate) / rate for row in shard_rows)
            shard.finish([[row["ID"], skipped[row["ID"]]] for row in shard_rows
                          if row["ID"] in skipped], round(seconds, 2))


def _document_start(header):
    return (f'{{"format": {json.dumps(ALIGNMENTS_FORMAT)}, "header": {json.dumps(header)}, '
            '"utterances": {')


def _document_has(path, header):
    """Whether the document at ``path`` was written, to its end, from shards with ``header``."""
    start = _document_start(header).encode("utf-8")
    if not Path(path).is_file():
        return False
    with open(path, "rb") as f:
        if f.read(len(start)) != start:
            return False
        f.seek(-3, 2)
        return f.read() == b"}}\n"


def write_alignments_document(path, alignments, header):
    """Writes the shards as one :func:`~sb_crossmodal_kd.alignment.corpus.save_alignments`
    file, streamed shard by shard (the bytes ``save_alignments`` writes for the same records
    and header)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(_document_start(header))
        separator = ""
        for index in range(len(alignments.paths)):
            for utt, record in alignments.shard(index).items():
                f.write(f"{separator}{json.dumps(utt)}: {json.dumps(record)}")
                separator = ", "
        f.write("}}\n")


def split_tree_statistics(alignments, manifest, aligner_path, lexicon_file=None,
                          oov_policy="g2p", jobs=1, text_key="wrd"):
    """Triphone-state statistics of an aligned split, each shard's computed by a worker and
    added in shard order (the same numbers whoever computed them); ``text_key`` is the
    manifest's transcript column (only checked to be there)."""
    rows = read_manifest(manifest, text_key)
    spec = (str(aligner_path), lexicon_file and str(lexicon_file), oov_policy)
    tasks = {i: (spec, alignments.paths[i], rows[start:stop])
             for i, (start, stop) in enumerate(alignments.ranges)}
    stats = None
    for _, part in shard_results(_shard_tree_statistics, tasks, jobs):
        if part is None:
            continue
        if stats is None:
            stats = part
        else:
            stats.update(part)
    if stats is None:
        raise ValueError(f"{manifest}: no manifest row has an alignment")
    return stats


def _shard_tree_statistics(spec, path, rows):
    aligner = _aligner(*spec)
    return accumulate_tree_statistics(read_shard(path), rows, aligner.features,
                                      aligner.settings.frame_rate.sample_rate)


def export_split_units(path, alignments, manifest, lexicon_hash, tree=None, tokenizer=None,
                       frame_rate=None, mode="majority", text_key="wrd", jobs=1):
    """Writes a split's unit store shard by shard: each shard's part store by a worker
    (``path``'s folder, ``.parts/``; kept for a re-run until the store is written), appended
    in shard order. The store is the bytes
    :func:`~sb_crossmodal_kd.alignment.corpus.export_units` writes for all rows.

    Returns
    -------
    dict
        ``{"utterances": written, "missing": [IDs without an alignment]}``.
    """
    from sb_crossmodal_kd.units.store import UnitStore, UnitStoreWriter

    path = Path(path)
    parts = path.with_name(f"{path.name}.parts")
    rows = read_manifest(manifest, text_key)
    options = (lexicon_hash, tree, tokenizer, frame_rate, mode, text_key)
    tasks = {i: (parts / f"part-{i:05d}.units", alignments.paths[i], rows[start:stop], options)
             for i, (start, stop) in enumerate(alignments.ranges)}
    report = {"utterances": 0, "missing": []}
    with ExitStack() as stack:
        # Rank 0 appends the parts as they come; the other ranks only build theirs.
        writer = stack.enter_context(UnitStoreWriter(path, _part_header(options, None)[0])) \
            if rank() == 0 else None
        for i, part_report in shard_results(_export_shard, tasks, jobs):
            report["utterances"] += part_report["utterances"]
            report["missing"] += part_report["missing"]
            if writer is not None:
                part = UnitStore(tasks[i][0])
                for utt in part.ids():
                    writer.add(utt, part[utt])
    _on_main(_remove_parts, parts, [task[0] for task in tasks.values()])
    return report


def _remove_parts(folder, parts):
    for part in parts:
        part.unlink(missing_ok=True)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def _part_header(options, shard_file):
    """The header of a split's store (``shard_file`` None) or of the part of one shard."""
    lexicon_hash, tree, tokenizer, frame_rate, mode, _ = options
    header = unit_store_header(lexicon_hash, tree, tokenizer, frame_rate, mode)
    if shard_file is None:
        return header, {}
    with open(shard_file, encoding="utf-8") as f:
        found = json.loads(f.readline())
    meta = {"alignments": f"{found['settings']}:{found['rows_digest']}"}
    header["meta"].update(meta)
    return header, meta


def _export_shard(part, shard_file, rows, options):
    from sb_crossmodal_kd.units.store import UnitStore

    lexicon_hash, tree, tokenizer, frame_rate, mode, text_key = options
    expected, meta = _part_header(options, shard_file)
    if part.is_file():
        try:
            found = UnitStore(part).header
        except ValueError as error:  # cut short
            found = {"problem": str(error)}
        if found == expected:
            ids = set(UnitStore(part).ids())
            return {"utterances": len(ids),
                    "missing": [row["ID"] for row in rows if row["ID"] not in ids]}
        logger.warning("%s: from other settings or alignments; rebuilding it", part)
    return export_units(part, read_shard(shard_file), rows, lexicon_hash, tree, tokenizer,
                        frame_rate, mode, text_key, progress=False, meta=meta)


def _on_main(function, *args):
    """Runs ``function`` on rank 0 only (every process without ``torchrun``); the others wait."""
    from speechbrain.utils.distributed import run_on_main

    run_on_main(function, args=list(args))
