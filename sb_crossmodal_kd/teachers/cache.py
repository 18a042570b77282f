"""Teacher cache: top-k teacher distributions for a whole manifest, on disk, memory-mapped.

:func:`build_cache` runs a teacher once over every utterance's unit sequence and stores, per
position, the top-k probabilities (float16), their unit ids (int32) and the residual mass
(float32, ``1 - sum`` of the float16 top-k, clamped at 0). :class:`TeacherCache` reads them back
as the same :class:`~sb_crossmodal_kd.teachers.base.TopKDistributions` triple a live teacher
gives, so the losses never know which one they got.

Layout of a cache folder::

    header.json              what the cache was built from (below) and whether it is complete
    shard_00000.bin          ids int32 [P, k] | residual float32 [P] | probs float16 [P, k]
    shard_00000.json         the shard's utterances: [[ID, first position, length], ...],
                             P, k, byte size and SHA-256 of the .bin
    ...

Each shard holds ``shard_size`` consecutive utterances of the input order. ``header.json``
names the teacher (its :meth:`~sb_crossmodal_kd.teachers.base.Teacher.describe`), the unit type,
the vocabulary size, the tokenizer / lexicon / tree hash, the temperature, ``k``, the shard size
and a hash of the input sequences.

The shards to compute go through :func:`~sb_crossmodal_kd.sharding.shard_results`: in this
process (``jobs=1``), in ``jobs`` spawned processes (the teacher is pickled to them), and
under ``torchrun`` over the ranks (shard ``i`` on rank ``i % world_size``, each rank with
``jobs`` processes of its own). Whoever computes a shard writes its two files; rank 0 alone
writes ``header.json``, before the shards (``complete: false``) and after them. A shard's
batches depend on the shard alone, so the folder is the same bytes whatever ``jobs`` and the
number of ranks are. Under ``torchrun`` the cache folder must be on storage every rank sees.

Writes are atomic (:mod:`sb_crossmodal_kd.io`: a temporary file in the same folder, renamed);
a shard counts as done once its ``.json`` exists and its ``.bin`` has the recorded size and
hash. An interrupted build, run again with the same arguments (any ``jobs``), skips the done
shards and recomputes the rest with the same batching, so the result is byte-identical to an
uninterrupted build (on a deterministic device). Running it with other arguments, or reading
the cache with another vocabulary, tokenizer, unit type, temperature or a larger ``k``, raises
:class:`CacheMismatchError` saying what differs.

Example
-------
>>> from sb_crossmodal_kd.teachers.base import Teacher
>>> class Bigram(Teacher):  # a deterministic toy teacher: prefers unit (previous + 1)
...     def unit_logits(self, unit_ids, lengths):
...         previous = torch.cat([unit_ids[:, :1] * 0, unit_ids[:, :-1]], 1)
...         return 3.0 * torch.nn.functional.one_hot((previous + 1) % 5, 5).float()
>>> teacher = Bigram(vocab_size=5, name="bigram", unit_type="toy", tokenizer_hash="t1")
>>> folder = getfixture("tmp_path") / "cache"
>>> header = build_cache(teacher, [("utt1", [1, 2, 3]), ("utt2", [4])], folder, k=2,
...                      progress=False)
>>> cache = TeacherCache(folder, vocab_size=5, tokenizer_hash="t1")
>>> dist = cache.distributions(["utt2", "utt1"])
>>> dist.top_ids.shape, dist.top_ids[1, :, 0].tolist()
(torch.Size([2, 3, 2]), [1, 2, 3])
>>> TeacherCache(folder, tokenizer_hash="other")
Traceback (most recent call last):
...
sb_crossmodal_kd.teachers.cache.CacheMismatchError: ...tokenizer_hash...
"""

import hashlib
import json
import pathlib

import numpy as np
import torch

from sb_crossmodal_kd.distributed import main_decides, main_first, rank, rank_device
from sb_crossmodal_kd.io import atomic_write_bytes
from sb_crossmodal_kd.sharding import (
    check_jobs,
    read_shard_info,
    shard_results,
    write_shard_files,
)
from sb_crossmodal_kd.sharding import json_bytes as _json_bytes
from sb_crossmodal_kd.sharding import shard_name as _shard_name
from sb_crossmodal_kd.teachers.base import TopKDistributions

FORMAT = "sb-crossmodal-kd teacher cache v1"
HEADER = "header.json"


class CacheMismatchError(ValueError):
    """A cache was built from something other than what it is used or resumed with."""




def _sequences_hash(utterances):
    digest = hashlib.sha256()
    for utt_id, units in utterances:
        digest.update(f"{utt_id}\t{' '.join(str(int(u)) for u in units)}\n".encode())
    return digest.hexdigest()


def _layout(n_positions, k):
    """Byte offsets of ids, residual, probs and the total size of a shard."""
    ids_bytes = 4 * n_positions * k
    residual_bytes = 4 * n_positions
    return 0, ids_bytes, ids_bytes + residual_bytes, ids_bytes + residual_bytes + 2 * n_positions * k


def _shard_done(folder, index):
    """True if shard ``index`` is complete and intact on disk."""
    return read_shard_info(folder, index) is not None


def _check_settings(found, wanted, folder, what):
    """Raises CacheMismatchError listing every setting where ``found`` differs from ``wanted``."""
    diffs = [
        f"{key}: cache has {found.get(key)!r}, {what} {value!r}"
        for key, value in wanted.items()
        if found.get(key) != value
    ]
    if diffs:
        raise CacheMismatchError(
            f"teacher cache {folder} does not match: " + "; ".join(diffs) + ". Rebuild it with "
            "`sbkd teacher-cache` for these units and teacher (or point to the right cache)."
        )


def build_cache(
    teacher,
    utterances,
    output_dir,
    k,
    tau=1.0,
    unit_type=None,
    tokenizer_hash=None,
    shard_size=1000,
    batch_size=32,
    device=None,
    progress=True,
    jobs=1,
):
    """Precomputes ``teacher``'s top-k distributions for every utterance; resumable, sharded.

    The shards still to do run through :func:`~sb_crossmodal_kd.sharding.shard_results`: in
    this process (``jobs=1``), in ``jobs`` spawned processes, and under ``torchrun`` each rank
    the shards ``i % world_size == rank``. Every shard's files are written by whoever computed
    it; rank 0 alone writes ``header.json``. The bytes do not depend on ``jobs`` or the number
    of ranks. Under ``torchrun`` this is a collective (every rank calls it with the same
    arguments) and ``output_dir`` must be on storage every rank sees.

    Arguments
    ---------
    teacher : Teacher
        Any :class:`~sb_crossmodal_kd.teachers.base.Teacher`. With ``jobs > 1`` it is pickled
        to the worker processes, so it must be picklable and on the CPU (each worker moves its
        copy to ``device``).
    utterances : sequence of (str, sequence of int)
        ``(utterance ID, unit ids)`` in the order to store them (e.g. manifest order).
    output_dir : str or path
        Cache folder (created; an unfinished build there with the same settings is resumed).
    k : int
        Probabilities kept per position (cut to the vocabulary size; ``k >= V`` keeps all).
    tau : float
        Teacher temperature.
    unit_type, tokenizer_hash : str, optional
        Default to the teacher's; recorded in the header and checked when reading.
    shard_size : int
        Utterances per shard file.
    batch_size : int
        Utterances per teacher call.
    device : str, optional
        Where the teacher runs (default: CUDA if available, else CPU). Under ``torchrun``,
        ``"cuda"`` means each rank's own GPU, ``cuda:LOCAL_RANK``.
    progress : bool
        Show a tqdm progress bar over positions (on rank 0, advanced shard by shard).
    jobs : int
        Processes on this machine (on each rank under ``torchrun``); checked before any work.

    Returns
    -------
    dict
        The header written to ``output_dir/header.json`` (the same on every rank).
    """
    check_jobs(jobs)
    folder = pathlib.Path(output_dir)
    utterances = [(str(utt_id), [int(u) for u in units]) for utt_id, units in utterances]
    _validate(utterances, teacher.vocab_size)
    if tokenizer_hash is not None and teacher.tokenizer_hash not in (None, tokenizer_hash):
        raise CacheMismatchError(
            f"{teacher.name} was built with tokenizer hash {teacher.tokenizer_hash!r} but the "
            f"units were built with {tokenizer_hash!r}: the unit ids do not mean the same thing"
        )
    if jobs > 1 and teacher.device.type != "cpu":
        raise ValueError(
            f"jobs={jobs} pickles the teacher to each worker process: pass it on the CPU "
            f"(it is on {teacher.device}); each worker moves its copy to device={device!r}"
        )
    settings = _settings(teacher, utterances, min(int(k), teacher.vocab_size), tau, unit_type,
                         tokenizer_hash, shard_size)
    start = _agreed_start(folder, settings)
    if "header" in start:
        return start["header"]
    device = rank_device(device)
    shards = {i: utterances[i * shard_size : (i + 1) * shard_size] for i in start["todo"]}
    tasks = {i: (folder, i, shard, teacher, settings["k"], tau, batch_size, device)
             for i, shard in shards.items()}
    bar = None
    if progress and rank() == 0:
        from tqdm import tqdm

        todo_positions = sum(len(units) for shard in shards.values() for _, units in shard)
        bar = tqdm(total=settings["n_positions"], unit="pos", desc=f"teacher cache {folder.name}",
                   initial=settings["n_positions"] - todo_positions)
    try:
        for _, info in shard_results(_build_shard, tasks, jobs):
            if bar is not None:
                bar.update(info["n_positions"])
    finally:
        if bar is not None:
            bar.close()
    header = {**settings, "complete": True}
    main_first(_write_header, folder / HEADER, header)  # the others wait for rank 0's write
    return header


def _settings(teacher, utterances, k, tau, unit_type, tokenizer_hash, shard_size):
    """What ``header.json`` records about a build (all but ``complete``)."""
    return {
        "format": FORMAT,
        "teacher": teacher.describe(),
        "context": teacher.context,
        "unit_type": unit_type if unit_type is not None else teacher.unit_type,
        "vocab_size": teacher.vocab_size,
        "tokenizer_hash": tokenizer_hash if tokenizer_hash is not None else teacher.tokenizer_hash,
        "temperature": float(tau),
        "k": k,
        "shard_size": int(shard_size),
        "n_shards": (len(utterances) + shard_size - 1) // shard_size,
        "n_utterances": len(utterances),
        "n_positions": sum(len(units) for _, units in utterances),
        "sequences_hash": _sequences_hash(utterances),
    }


def _start(folder, settings):
    """Opens (or creates) the cache folder for a build with ``settings``, before any shard.

    Refuses a header with other settings; returns ``{"header": header}`` when the cache is
    already complete, else writes the initial header if there is none, removes the temporary
    files an interrupted write left, and returns ``{"todo": [shard indices not done]}``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    header_path = folder / HEADER
    if header_path.is_file():
        existing = json.loads(header_path.read_text())
        existing_settings = {key: value for key, value in existing.items() if key != "complete"}
        _check_settings(existing_settings, settings, folder, "this build asks for")
        if existing.get("complete"):
            return {"header": existing}
    else:
        atomic_write_bytes(header_path, _json_bytes({**settings, "complete": False}))
    # Left by an interrupted write (".tmp-*": by versions before the io helpers).
    for stale in [*folder.glob(".*.tmp"), *folder.glob(".tmp-*")]:
        stale.unlink()
    return {"todo": [i for i in range(settings["n_shards"]) if not _shard_done(folder, i)]}


def _agreed_start(folder, settings):
    """:func:`_start` on rank 0, its answer (or its error) on every rank.

    The other ranks neither write nor look at the folder themselves: they could see shards
    rank 0 has started writing and disagree on what is to do.
    """
    return main_decides(_start, folder, settings)


def _write_header(path, header):
    """Writes ``header`` on rank 0 (atomically); the other ranks write nothing."""
    if rank() == 0:
        atomic_write_bytes(path, _json_bytes(header))


def _validate(utterances, vocab_size):
    seen = set()
    for utt_id, units in utterances:
        if utt_id in seen:
            raise ValueError(f"utterance {utt_id!r} appears twice in the input of the cache")
        seen.add(utt_id)
        if not units:
            raise ValueError(f"utterance {utt_id!r} has an empty unit sequence; drop it first")
        bad = [u for u in units if not 0 <= u < vocab_size]
        if bad:
            raise ValueError(
                f"utterance {utt_id!r} has unit ids {bad[:5]} outside the teacher's vocabulary "
                f"0..{vocab_size - 1}: units and teacher do not match"
            )


def _build_shard(folder, index, shard, teacher, k, tau, batch_size, device):
    """Computes shard ``index`` of :func:`build_cache` and writes its files; its worker.

    Runs in the calling process, a spawned worker or a rank (a module-level function, so that
    it pickles). Moves ``teacher`` to ``device``, writes ``shard_{index}.bin`` then its
    ``.json``, each atomically, and returns ``{"shard": index, "n_positions": positions}``
    (the arrays stay here, nothing large goes back through pickling).
    """
    teacher = teacher.to(device)
    ids, probs, starts, lengths = _shard_arrays(shard, teacher, k, tau, batch_size, device)
    _write_shard_files(folder, index, shard, ids, probs, starts, lengths)
    return {"shard": index, "n_positions": len(ids)}


def _shard_arrays(shard, teacher, k, tau, batch_size, device):
    """A shard's top-k ``ids`` int32 and ``probs`` float16 ``[P, k]``, and each utterance's
    first position and length; the batching depends on the shard alone."""
    lengths = [len(units) for _, units in shard]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    n_positions = int(sum(lengths))
    ids = np.zeros((n_positions, k), dtype=np.int32)
    probs = np.zeros((n_positions, k), dtype=np.float16)
    # Longest first inside the shard: less padding, and a fixed order, so that a resumed build
    # batches exactly as an uninterrupted one.
    order = sorted(range(len(shard)), key=lambda i: (-lengths[i], i))
    for first in range(0, len(order), batch_size):
        members = order[first : first + batch_size]
        batch_lengths = torch.tensor([lengths[i] for i in members])
        unit_ids = torch.zeros(len(members), int(batch_lengths.max()), dtype=torch.long)
        for row, i in enumerate(members):
            unit_ids[row, : lengths[i]] = torch.tensor(shard[i][1])
        dist = teacher.distributions(unit_ids.to(device), batch_lengths.to(device), k, tau)
        top_probs = dist.top_probs.to(torch.float16).cpu().numpy()
        top_ids = dist.top_ids.to(torch.int32).cpu().numpy()
        for row, i in enumerate(members):
            span = slice(starts[i], starts[i] + lengths[i])
            probs[span] = top_probs[row, : lengths[i]]
            ids[span] = top_ids[row, : lengths[i]]
    return ids, probs, starts, lengths


def _write_shard_files(folder, index, shard, ids, probs, starts, lengths):
    """Writes a shard's .bin then its .json (which marks it done), each atomically."""
    # The residual is what the stored (float16) top-k leaves, so stored parts sum to one.
    residual = np.clip(1.0 - probs.astype(np.float32).sum(-1), 0.0, None).astype(np.float32)
    data = ids.tobytes() + residual.tobytes() + probs.tobytes()
    write_shard_files(folder, index, data, {
        "shard": index,
        "k": ids.shape[1],
        "n_positions": len(ids),
        "utterances": [[utt_id, int(s), n] for (utt_id, _), s, n in zip(shard, starts, lengths, strict=True)],
    })


def utterances_from_manifest(manifest, text_units, column="wrd"):
    """``(ID, unit ids)`` for every row of a SpeechBrain CSV manifest, in manifest order.

    Arguments
    ---------
    manifest : str or path
        CSV with an ``ID`` column and a transcript column.
    text_units : callable
        ``text_units(text, utterance_id=...) -> list of int``, e.g.
        :class:`~sb_crossmodal_kd.units.types.TextUnits`.
    column : str
        Transcript column.

    Returns
    -------
    utterances : list of (str, list of int)
    skipped : list of (str, str)
        Utterances the converter refused (e.g. out-of-vocabulary words under the lexicon's
        ``skip`` policy) or that gave no units, with the reason.
    """
    import csv

    utterances, skipped = [], []
    with open(manifest, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        for name in ("ID", column):
            if name not in (reader.fieldnames or []):
                raise ValueError(f"{manifest}: no {name!r} column (columns: {reader.fieldnames})")
        for row in reader:
            try:
                units = text_units(row[column], utterance_id=row["ID"])
            except KeyError as error:  # the lexicon's OutOfVocabularyError is a KeyError
                skipped.append((row["ID"], str(error)))
                continue
            if not units:
                skipped.append((row["ID"], "no units"))
                continue
            utterances.append((row["ID"], units))
    return utterances, skipped


def utterances_from_unit_store(path, unit_type):
    """``(ID, unit ids)`` from a unit store (``sbkd export-units``), and its units hash.

    The sequences are exactly those the store's frame alignments index, so cached positions
    line up with ``frame_to_position``. The hash is built from the store's header as
    :class:`~sb_crossmodal_kd.units.types.UnitType` does.

    Arguments
    ---------
    path : str or path
        A store written by :class:`sb_crossmodal_kd.units.store.UnitStoreWriter`.
    unit_type : str
        ``"subword"``, ``"monophone"`` or ``"senone"``.
    """
    from sb_crossmodal_kd.units.store import UnitStore
    from sb_crossmodal_kd.units.types import units_hash

    store = UnitStore(path)
    stream = f"{unit_type}.units"
    utterances = []
    for utt_id in store.ids():
        record = store[utt_id]
        if stream not in record:
            raise ValueError(f"unit store {path}: utterance {utt_id!r} has no {stream!r} stream")
        utterances.append((utt_id, record[stream].tolist()))
    header = store.header
    return utterances, units_hash(unit_type, tokenizer=header.get("tokenizer"),
                                  lexicon=header.get("lexicon"), tree=header.get("tree"))


class TeacherCache:
    """Reads a cache built by :func:`build_cache`, memory-mapped, refusing mismatches.

    Arguments
    ---------
    folder : str or path
        The cache folder.
    vocab_size, tokenizer_hash, unit_type, temperature : optional
        What the caller's units and setup are; any that differs from the header raises
        :class:`CacheMismatchError`. ``None`` skips that check.
    k : int, optional
        Read only the top ``k`` (at most the stored ``k``, unless the cache stores the whole
        vocabulary: then a larger ``k`` reads all of it); the mass of the dropped
        probabilities moves into the residual.
    """

    def __init__(
        self, folder, vocab_size=None, tokenizer_hash=None, unit_type=None, temperature=None,
        k=None,
    ):
        self.folder = pathlib.Path(folder)
        header_path = self.folder / HEADER
        if not header_path.is_file():
            raise FileNotFoundError(f"{header_path} not found: not a teacher cache folder")
        self.header = json.loads(header_path.read_text())
        if self.header.get("format") != FORMAT:
            raise CacheMismatchError(
                f"{header_path}: format {self.header.get('format')!r}, expected {FORMAT!r}"
            )
        if not self.header.get("complete"):
            raise CacheMismatchError(
                f"teacher cache {self.folder} is incomplete (its build was interrupted); run the "
                "same `sbkd teacher-cache` command again to finish it"
            )
        wanted = {
            "vocab_size": vocab_size,
            "tokenizer_hash": tokenizer_hash,
            "unit_type": unit_type,
            "temperature": None if temperature is None else float(temperature),
        }
        _check_settings(self.header, {a: b for a, b in wanted.items() if b is not None},
                        self.folder, "the caller expects")
        self.stored_k = self.header["k"]
        self.k = self.stored_k if k is None else int(k)
        if self.k > self.stored_k >= self.header["vocab_size"]:
            # The cache holds every unit's probability (a vocabulary no larger than k, as a
            # small-vocabulary task has): that is all a larger k could read.
            self.k = self.stored_k
        if self.k > self.stored_k:
            raise CacheMismatchError(
                f"teacher cache {self.folder} keeps the top {self.stored_k} per position; "
                f"k={self.k} was asked for. Rebuild with a larger k or ask for less."
            )
        self.vocab_size = self.header["vocab_size"]
        self.index = {}
        self._shard_sizes = []
        for shard in range(self.header["n_shards"]):
            info = json.loads((self.folder / f"{_shard_name(shard)}.json").read_text())
            self._shard_sizes.append(info["n_positions"])
            for utt_id, start, length in info["utterances"]:
                self.index[utt_id] = (shard, start, length)
        self._maps = {}

    def __len__(self):
        return len(self.index)

    def __contains__(self, utt_id):
        return utt_id in self.index

    def __getstate__(self):
        # Memory maps are reopened lazily in each DataLoader worker.
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state

    def _arrays(self, shard):
        if shard not in self._maps:
            n, k = self._shard_sizes[shard], self.stored_k
            path = self.folder / f"{_shard_name(shard)}.bin"
            ids_at, residual_at, probs_at, _ = _layout(n, k)
            self._maps[shard] = (
                np.memmap(path, np.int32, "r", offset=ids_at, shape=(n, k)),
                np.memmap(path, np.float32, "r", offset=residual_at, shape=(n,)),
                np.memmap(path, np.float16, "r", offset=probs_at, shape=(n, k)),
            )
        return self._maps[shard]

    def _lookup(self, utt_id):
        try:
            return self.index[utt_id]
        except KeyError:
            raise KeyError(
                f"utterance {utt_id!r} is not in teacher cache {self.folder} "
                f"({len(self.index)} utterances); was it built from this manifest?"
            ) from None

    def utterance(self, utt_id):
        """``(top_probs [K, k] float32, top_ids [K, k] int64, residual [K] float32)``.

        Suited to a SpeechBrain dynamic item: SpeechBrain's collation pads each of the three.
        """
        shard, start, length = self._lookup(utt_id)
        ids, residual, probs = self._arrays(shard)
        span = slice(start, start + length)
        top_probs = torch.from_numpy(probs[span, : self.k].astype(np.float32))
        top_ids = torch.from_numpy(ids[span, : self.k].astype(np.int64))
        rest = torch.from_numpy(residual[span].copy())
        if self.k < self.stored_k:
            dropped = probs[span, self.k :].astype(np.float32).sum(-1)
            rest = rest + torch.from_numpy(dropped)
        return top_probs, top_ids, rest

    def distributions(self, utt_ids, max_len=None, device=None):
        """Padded :class:`TopKDistributions` ``[B, max_len, k]`` for a batch of utterances.

        Arguments
        ---------
        utt_ids : sequence of str
            Utterance IDs (e.g. ``batch.id``).
        max_len : int, optional
            Pad to this many positions (default: the longest); an utterance longer than
            ``max_len`` is an error (its units do not match the cache).
        device : str, optional
            Where to put the tensors.
        """
        items = [self.utterance(utt_id) for utt_id in utt_ids]
        longest = max(len(item[2]) for item in items)
        if max_len is None:
            max_len = longest
        elif longest > max_len:
            worst = utt_ids[max(range(len(items)), key=lambda i: len(items[i][2]))]
            raise CacheMismatchError(
                f"utterance {worst!r} has {longest} positions in teacher cache {self.folder} "
                f"but the batch has only {max_len}: the cache was built from other units"
            )
        top_probs = torch.zeros(len(items), max_len, self.k)
        top_ids = torch.zeros(len(items), max_len, self.k, dtype=torch.long)
        residual = torch.zeros(len(items), max_len)
        for row, (p, i, r) in enumerate(items):
            top_probs[row, : len(r)] = p
            top_ids[row, : len(r)] = i
            residual[row, : len(r)] = r
        dist = TopKDistributions(top_probs, top_ids, residual)
        return dist if device is None else dist.to(device)

    def length(self, utt_id):
        """Number of positions stored for ``utt_id``."""
        return self._lookup(utt_id)[2]

    def statistics(self):
        """How far the teacher's targets are from one-hot, over every stored position.

        Returns ``{"mean_entropy": nats, "mean_top1": probability, "n_positions": int}``.
        The entropy counts the top-k probabilities exactly and spreads the residual mass
        evenly over the other ``V - k`` units (an upper bound on the part that was cut;
        exact when ``k >= V``). 0 nats is a one-hot target; ``log V`` a uniform one.
        """
        total_entropy, total_top1, n = 0.0, 0.0, 0
        rest_units = max(self.vocab_size - self.stored_k, 0)
        for shard in range(len(self._shard_sizes)):
            ids, residual, probs = self._arrays(shard)
            p = np.asarray(probs, dtype=np.float64)
            r = np.clip(np.asarray(residual, dtype=np.float64), 0.0, None)
            entropy = -(p * np.log(np.clip(p, 1e-12, None))).sum(-1)
            if rest_units:
                entropy += np.where(r > 0, -r * np.log(np.clip(r / rest_units, 1e-12, None)),
                                    0.0)
            total_entropy += float(entropy.sum())
            total_top1 += float(p.max(-1).sum())
            n += len(p)
        return {"mean_entropy": round(total_entropy / max(n, 1), 4),
                "mean_top1": round(total_top1 / max(n, 1), 4), "n_positions": n}
