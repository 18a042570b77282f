"""Worker pools shared by a chain's sharded steps, and the shards kept in flight."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sb_crossmodal_kd.sharding import shard_results
from sb_crossmodal_kd.workers import shared_workers, worker_pool


def _pid(_):
    return os.getpid()


def _mark_and_wait(folder, index, seconds):
    (Path(folder) / f"started_{index}").touch()
    time.sleep(seconds)
    return index * index


def test_a_chain_starts_its_workers_once_and_stops_them_at_its_end():
    with shared_workers():
        first = {pid for _, pid in shard_results(_pid, {i: (i,) for i in range(6)}, jobs=2)}
        # a later step, and one with a single shard, run in the same processes
        again = {pid for _, pid in shard_results(_pid, {i: (i,) for i in range(6)}, jobs=2)}
        single = {pid for _, pid in shard_results(_pid, {0: (0,)}, jobs=2)}
        with worker_pool(1) as pool:  # a smaller pool is served by the open one
            smaller = set(pool.map(_pid, range(4)))
    assert len(first) == 2 and os.getpid() not in first
    assert again <= first and single <= first and smaller <= first
    assert not any(_alive(pid) for pid in first)  # shut down (and joined) with the scope


def test_outside_a_chain_each_call_has_its_own_workers_and_one_shard_runs_here():
    first = {pid for _, pid in shard_results(_pid, {i: (i,) for i in range(4)}, jobs=2)}
    again = {pid for _, pid in shard_results(_pid, {i: (i,) for i in range(4)}, jobs=2)}
    assert not first & again
    assert {pid for _, pid in shard_results(_pid, {0: (0,)}, jobs=2)} == {os.getpid()}


@pytest.mark.parametrize("shared", [False, True])
def test_a_slow_first_shard_keeps_results_in_order_with_few_shards_in_flight(tmp_path, shared):
    tasks = {i: (str(tmp_path), i, 2.0 if i == 0 else 0.01) for i in range(12)}
    results, started_at_first = [], None
    with shared_workers() if shared else contextlib.nullcontext():
        for index, value in shard_results(_mark_and_wait, tasks, jobs=2):
            if started_at_first is None:
                started_at_first = len(list(tmp_path.glob("started_*")))
            results.append((index, value))
    assert results == [(i, i * i) for i in range(12)]
    # while shard 0 runs, the other worker went on with shards 1 to 3 (2 * jobs in flight;
    # one more submitted as the first is taken), never all 12 at once
    assert 4 <= started_at_first <= 5


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # an exited orphan may stay a zombie where nothing reaps it (a container's pid 1)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


ORPHANED_DRIVER = """
import os, time
from sb_crossmodal_kd.workers import process_pool

pool = process_pool(1)
print(pool.submit(os.getpid).result(), flush=True)  # the worker, for the test to watch
pool.submit(time.sleep, 600)
time.sleep(600)
"""


def test_a_killed_driver_takes_its_workers_with_it(tmp_path):
    # SIGKILL gives the driver no chance to stop its pool; its worker must not train on.
    driver = subprocess.Popen([sys.executable, "-c", ORPHANED_DRIVER], stdout=subprocess.PIPE,
                              text=True)
    worker = int(driver.stdout.readline())
    assert _alive(worker)
    driver.kill()
    driver.wait()
    deadline = time.time() + 30
    while _alive(worker) and time.time() < deadline:
        time.sleep(0.1)
    orphaned = _alive(worker)
    if orphaned:
        os.kill(worker, signal.SIGKILL)
    assert not orphaned
