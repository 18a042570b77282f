"""Worker processes on one machine, as the data chain and the ablation use them.

Spawned, not forked (no copied torch or eSpeak state), each with its own share of torch
threads: small models use a CPU best as one single-threaded process per core, and
oversubscribed threads made every epoch several times slower.

A worker ends itself within a second of its parent's death. Killed by a signal it cannot
catch (SIGKILL, the out-of-memory killer, or SIGTERM sent to it alone), the driver would
otherwise leave its workers training on, and a rerun that resumes the same output folder
would train the same run in two processes at once.

A spawned worker pays its start-up (importing torch and SpeechBrain, then loading what its
tasks need, e.g. the lexicon and the aligner: seconds) once per pool. Inside
:func:`shared_workers`, :func:`worker_pool` hands every caller the same open pool of a given
size, so a chain of sharded steps starts its workers once, and they keep what they loaded.

Example
-------
>>> with process_pool(2) as pool:
...     sorted(pool.map(abs, [-2, 1]))
[1, 2]
"""

import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager

__all__ = ["in_shared_workers", "process_pool", "shared_workers", "stop", "worker_pool"]

# (workers, threads) -> the open pool of the innermost shared_workers() scope; None outside.
_shared = None


def _start_worker(threads, parent):
    import torch

    torch.set_num_threads(threads)
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()


def _exit_when_orphaned(parent, interval=0.5):
    # The parent's death re-parents this process (to init or a subreaper).
    while os.getppid() == parent:
        time.sleep(interval)
    os._exit(1)


class _Pool(ProcessPoolExecutor):
    """A ``ProcessPoolExecutor`` whose ``with`` block, left by an exception (Ctrl-C
    included), stops the work at once instead of waiting for it (:func:`stop`)."""

    def __exit__(self, kind, error, traceback):
        if kind is None:
            return super().__exit__(kind, error, traceback)
        stop(self)
        return False


def process_pool(workers, threads=1):
    """A ``ProcessPoolExecutor`` of ``workers`` spawned processes with ``threads`` torch
    threads each; its ``with`` block stops the work at once when left by an exception."""
    return _Pool(workers, mp_context=multiprocessing.get_context("spawn"),
                 initializer=_start_worker, initargs=(threads, os.getpid()))


def stop(pool):
    """Stops ``pool`` at once: the work not started is cancelled and the workers end.

    ``shutdown`` would wait for every queued task (a driver interrupted would go on
    synthesising a whole corpus, or training its runs for hours); a run a worker was doing
    resumes from its last checkpoint next time.
    """
    pool.shutdown(wait=False, cancel_futures=True)
    # No public way to end the workers before Python 3.14 (terminate_workers).
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.terminate()


@contextmanager
def shared_workers():
    """A scope in which :func:`worker_pool` reuses one pool per size; all shut down at its end.

    Nested scopes share the outer one's pools.
    """
    global _shared
    if _shared is not None:
        yield
        return
    _shared = {}
    try:
        yield
    except BaseException:
        for pool in _shared.values():
            stop(pool)
        raise
    else:
        for pool in _shared.values():
            pool.shutdown()
    finally:
        _shared = None


def in_shared_workers():
    """Whether a :func:`shared_workers` scope is open (its pools cost nothing more to use)."""
    return _shared is not None


@contextmanager
def worker_pool(workers, threads=1):
    """A pool of at least ``workers`` processes for the ``with`` block: inside
    :func:`shared_workers` the scope's open one with ``threads`` threads and as many workers
    or more (started on first use, left running), else a new one shut down at the end of the
    block."""
    if _shared is None:
        with process_pool(workers, threads) as pool:
            yield pool
        return
    sizes = [size for size, each in _shared if size >= workers and each == threads]
    key = (min(sizes), threads) if sizes else (workers, threads)
    if key not in _shared:
        _shared[key] = process_pool(workers, threads)
    yield _shared[key]
