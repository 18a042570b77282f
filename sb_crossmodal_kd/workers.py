"""Worker processes on one machine, as the data chain and the ablation use them.

Spawned, not forked (no copied torch or eSpeak state), each with its own share of torch
threads: small models use a CPU best as one single-threaded process per core, and
oversubscribed threads made every epoch several times slower.

Example
-------
>>> with process_pool(2) as pool:
...     sorted(pool.map(abs, [-2, 1]))
[1, 2]
"""

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

__all__ = ["process_pool"]


def _set_threads(threads):
    import torch

    torch.set_num_threads(threads)


def process_pool(workers, threads=1):
    """A ``ProcessPoolExecutor`` of ``workers`` spawned processes with ``threads`` torch
    threads each."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_set_threads, initargs=(threads,))
