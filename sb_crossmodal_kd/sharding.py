"""Cutting a split's rows into shards, and running per-shard work over processes or ranks.

A split's manifest rows are cut into contiguous shards of ``shard_size`` rows. The layout
depends on the number of rows and the shard size only, never on how many processes do the
work, so an output built shard by shard and merged in shard order is the same bytes whether
one process, ``jobs`` processes or the ranks of a ``torchrun`` made it.

:func:`shard_results` calls a function once per shard and yields the results in shard order:
in this process (``jobs=1``), in a :func:`~sb_crossmodal_kd.workers.process_pool`
(``jobs > 1``), or, under ``torchrun``, each rank the shards ``i`` with
``i % world_size == rank``. Every rank receives every shard's result, round by round
(``world_size * jobs`` shards a round), so a caller folding them in order holds a round's
results at most, and folds them in the same order whoever computed them.

Example
-------
>>> shard_ranges(5, 2)
[(0, 2), (2, 4), (4, 5)]
>>> list(shard_results(divmod, {0: (7, 2), 1: (9, 4)}))
[(0, (3, 1)), (1, (2, 1))]
"""

from contextlib import ExitStack

from sb_crossmodal_kd.distributed import gather_objects, rank, world_size
from sb_crossmodal_kd.workers import process_pool

__all__ = ["check_jobs", "shard_ranges", "shard_results"]


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
    with ExitStack() as stack:
        pool = stack.enter_context(process_pool(workers)) if workers > 1 else None
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
