"""Cutting a split's rows into shards, and running per-shard work over processes or ranks.

A split's manifest rows are cut into contiguous shards of ``shard_size`` rows. The layout
depends on the number of rows and the shard size only, never on how many processes do the
work, so an output built shard by shard and merged in shard order is the same bytes whether
one process, ``jobs`` processes or the ranks of a ``torchrun`` made it.

:func:`shard_results` calls a function once per shard and yields the results in shard order:
in this process (``jobs=1``), in a :func:`~sb_crossmodal_kd.workers.worker_pool`
(``jobs > 1``; inside :func:`~sb_crossmodal_kd.workers.shared_workers` the one every step of
a chain shares), or, under ``torchrun``, each rank the shards ``i`` with
``i % world_size == rank``. On one machine the workers never wait for each other: ``2 * jobs``
shards are in flight, the next submitted as each result is taken in order. Under
``torchrun`` every rank receives every shard's result, round by round (``world_size * jobs``
shards a round). Either way a caller folding the results in order holds a few rounds' at
most, and folds them in the same order whoever computed them.

Example
-------
>>> shard_ranges(5, 2)
[(0, 2), (2, 4), (4, 5)]
>>> list(shard_results(divmod, {0: (7, 2), 1: (9, 4)}))
[(0, (3, 1)), (1, (2, 1))]
"""

import hashlib
import json
from collections import deque
from contextlib import ExitStack
from pathlib import Path

from sb_crossmodal_kd.distributed import gather_objects, rank, world_size
from sb_crossmodal_kd.io import atomic_write_bytes
from sb_crossmodal_kd.workers import in_shared_workers, worker_pool

__all__ = ["check_jobs", "json_bytes", "read_shard_info", "shard_name", "shard_ranges",
           "shard_results", "write_shard_files"]


def shard_ranges(n_rows, shard_size):
    """``[(start, stop), ...]`` row ranges of ``n_rows`` rows cut every ``shard_size`` rows.

    Example
    -------
    >>> shard_ranges(0, 3)
    []
    >>> shard_ranges(3, 0)
    Traceback (most recent call last):
    ...
    ValueError: shard_size must be a positive number of rows, got 0
    """
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive number of rows, got {shard_size!r}")
    return [(start, min(start + shard_size, n_rows)) for start in range(0, n_rows, shard_size)]


def check_jobs(jobs):
    """Refuses a ``jobs`` that is not a positive integer (before any work).

    Example
    -------
    >>> check_jobs(2)
    >>> check_jobs(0)
    Traceback (most recent call last):
    ...
    ValueError: jobs must be a positive number of processes, got 0
    """
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive number of processes, got {jobs!r}")


def shard_results(function, tasks, jobs=1):
    """Yields ``(index, function(*args))`` for the ``tasks`` ``{shard index: args}``, in order.

    Arguments
    ---------
    function : callable
        A module-level function (it is pickled to the worker processes).
    tasks : dict
        Shard index -> tuple of arguments. Under ``torchrun`` every rank must pass the same
        indices (a collective: all ranks iterate to the end).
    jobs : int
        Processes on this machine (more than there are shards is fine: no more start).
        Under ``torchrun`` each rank runs its own shards in this many processes.

    Yields
    ------
    tuple
        ``(shard index, result)``, in shard order, on every rank.
    """
    check_jobs(jobs)
    order = sorted(tasks)
    size, me = world_size(), rank()
    per_round = size * jobs
    workers = min(jobs, -(-len(order) // size)) if order else 1
    if size == 1 and order and (workers > 1 or (jobs > 1 and in_shared_workers())):
        # (a chain's open workers already hold what a shard needs: use them for one too)
        yield from _in_flight(function, tasks, order, jobs if in_shared_workers() else workers)
        return
    with ExitStack() as stack:
        pool = stack.enter_context(worker_pool(workers)) if workers > 1 else None
        for first in range(0, len(order), per_round):
            mine = [i for i in order[first:first + per_round] if i % size == me]
            if pool is None:
                results = {i: function(*tasks[i]) for i in mine}
            else:
                futures = {i: pool.submit(function, *tasks[i]) for i in mine}
                results = {i: future.result() for i, future in futures.items()}
            if size > 1:
                for part in gather_objects(results):
                    results.update(part)
            yield from sorted(results.items())


def _in_flight(function, tasks, order, jobs):
    """:func:`shard_results` on one machine: ``2 * jobs`` shards in flight in ``jobs``
    workers, yielded in ``order`` (a slow shard holds back the yielding, not the workers)."""
    with worker_pool(jobs) as pool:
        pending, todo = deque(), iter(order)
        for index in todo:
            pending.append((index, pool.submit(function, *tasks[index])))
            if len(pending) == 2 * jobs:
                break
        while pending:
            index, future = pending.popleft()
            result = future.result()
            following = next(todo, None)
            if following is not None:
                pending.append((following, pool.submit(function, *tasks[following])))
            yield index, result


# A shard of binary arrays on disk (teacher caches, the LMs' unit text): ``shard_NNNNN.bin``
# and ``shard_NNNNN.json``, the .json written last and recording the .bin's size and SHA-256,
# so a shard is done once its .json exists and its .bin still matches it.


def json_bytes(obj):
    """``obj`` as the indented, key-sorted JSON bytes of shard and header files."""
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def shard_name(index):
    """The files' name (without extension) of shard ``index``.

    Example
    -------
    >>> shard_name(3)
    'shard_00003'
    """
    return f"shard_{index:05d}"


def write_shard_files(folder, index, data, info):
    """Writes shard ``index``'s ``.bin`` (``data``) then its ``.json`` (``info`` with the
    ``.bin``'s ``bytes`` and ``sha256``), each atomically: the ``.json`` marks it done.

    Example
    -------
    >>> folder = getfixture("tmp_path")
    >>> write_shard_files(folder, 0, b"abc", {"shard": 0})
    >>> read_shard_info(folder, 0)["bytes"], read_shard_info(folder, 1)
    (3, None)
    >>> _ = (folder / "shard_00000.bin").write_bytes(b"abd")  # changed: no longer done
    >>> read_shard_info(folder, 0) is None
    True
    """
    name = shard_name(index)
    atomic_write_bytes(Path(folder) / f"{name}.bin", data)
    info = {**info, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    atomic_write_bytes(Path(folder) / f"{name}.json", json_bytes(info))


def read_shard_info(folder, index):
    """Shard ``index``'s ``.json`` if the shard is complete and intact on disk, else ``None``
    (a file missing, unreadable, or a ``.bin`` of another size or hash)."""
    name = shard_name(index)
    info_path, bin_path = Path(folder) / f"{name}.json", Path(folder) / f"{name}.bin"
    if not info_path.is_file() or not bin_path.is_file():
        return None
    try:
        info = json.loads(info_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(info, dict) or bin_path.stat().st_size != info.get("bytes"):
        return None
    if hashlib.sha256(bin_path.read_bytes()).hexdigest() != info.get("sha256"):
        return None
    return info
