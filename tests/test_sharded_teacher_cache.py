"""Teacher caches built shard by shard: the same bytes for 1, 2 and more processes than shards
and under torchrun, a resumed build recomputing only the shards that are missing or cut
short, and a bad ``jobs`` refused before anything is written.

The teacher is a tiny real unit LM (its class is the package's, so spawned workers unpickle
it)."""

import json
import os
import shutil
import subprocess
import textwrap

import pytest
import torch
from launch import torchrun_command
from test_teacher_cache import _teacher, _utterances

from sb_crossmodal_kd.teachers.cache import TeacherCache, build_cache

# 13 utterances in shards of 5: 3 shards (5, 5, 3 utterances; 3, 3 and 2 batches of 2).
SETTINGS = {"k": 6, "tau": 1.5, "shard_size": 5, "batch_size": 2}
N_UTTERANCES = 13


def _files(folder):
    """Every file of a cache folder (shards, header, anything left over), by name."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """The cache built by one process: its folder, teacher and utterances."""
    folder = tmp_path_factory.mktemp("cache") / "one"
    teacher, utterances = _teacher(), _utterances(N_UTTERANCES)
    build_cache(teacher, utterances, folder, progress=False, **SETTINGS)
    return folder, teacher, utterances


def test_the_same_bytes_for_1_2_and_more_jobs_than_shards(one, tmp_path):
    folder, teacher, utterances = one
    expected = _files(folder)
    assert sorted(expected) == ["header.json", *[f"shard_{i:05d}.{ext}" for i in range(3)
                                                 for ext in ("bin", "json")]]
    for jobs in (2, 7):  # 7: more processes than shards (3 start)
        header = build_cache(teacher, utterances, tmp_path / f"jobs{jobs}", jobs=jobs,
                             progress=jobs == 2, **SETTINGS)
        assert _files(tmp_path / f"jobs{jobs}") == expected
        assert header == json.loads(expected["header.json"]) and header["complete"]
    assert len(TeacherCache(tmp_path / "jobs2")) == N_UTTERANCES


def test_a_resumed_build_recomputes_only_the_missing_and_cut_shards(one, tmp_path):
    folder, teacher, utterances = one
    work = tmp_path / "work"
    shutil.copytree(folder, work)
    header = json.loads((work / "header.json").read_text())
    (work / "header.json").write_text(json.dumps({**header, "complete": False}))  # interrupted
    (work / "shard_00001.bin").unlink()
    cut = (work / "shard_00002.bin").read_bytes()
    (work / "shard_00002.bin").write_bytes(cut[: len(cut) // 2])
    kept = {name: (work / name).stat().st_mtime_ns for name in ("shard_00000.bin",
                                                                "shard_00000.json")}
    build_cache(teacher, utterances, work, jobs=2, progress=False, **SETTINGS)
    assert _files(work) == _files(folder)
    assert {name: (work / name).stat().st_mtime_ns for name in kept} == kept
    for name in ("shard_00001.json", "shard_00002.json"):  # rewritten, to the same bytes
        assert (work / name).stat().st_mtime_ns != (folder / name).stat().st_mtime_ns


def test_bad_jobs_or_a_teacher_off_the_cpu_are_refused_before_any_write(tmp_path):
    teacher, utterances = _teacher(), _utterances(3)
    for jobs in (0, -1, 1.5):
        with pytest.raises(ValueError, match="jobs must be a positive number of processes"):
            build_cache(teacher, utterances, tmp_path / "cache", jobs=jobs, **SETTINGS)
    assert not (tmp_path / "cache").exists()
    with pytest.raises(ValueError, match="pass it on the CPU"):
        build_cache(teacher.to("meta"), utterances, tmp_path / "cache", jobs=2, **SETTINGS)
    assert not (tmp_path / "cache").exists()


def test_sbkd_teacher_cache_passes_jobs(tmp_path):
    import numpy as np

    from sb_crossmodal_kd.cli import main
    from sb_crossmodal_kd.teachers.unit_lm import UnitLM, export_unit_lm
    from sb_crossmodal_kd.units.store import UnitStoreWriter

    with UnitStoreWriter(tmp_path / "train.units", {"lexicon": "cmudict:aa"}) as writer:
        writer.add("u1", {"monophone.units": np.array([3, 4, 5])})
    export_unit_lm(tmp_path / "lm", UnitLM(8, embedding_dim=8, hidden_size=8, num_layers=1),
                   unit_type="monophone", tokenizer_hash="cmudict:aa")
    with pytest.raises(ValueError, match="jobs must be a positive number of processes, got 0"):
        main(["teacher-cache", "--units-store", str(tmp_path / "train.units"), "--units",
              "monophone", "--teacher", str(tmp_path / "lm"), "--output",
              str(tmp_path / "cache"), "--jobs", "0"])
    assert not (tmp_path / "cache").exists()


TORCHRUN_WORKER = textwrap.dedent(
    """
    import json
    import sys
    from pathlib import Path

    import torch

    from sb_crossmodal_kd.distributed import init_distributed, rank
    from sb_crossmodal_kd.teachers.base import Teacher
    from sb_crossmodal_kd.teachers.cache import CacheMismatchError, build_cache


    class Counting(Teacher):
        # The real teacher, counting the batches this rank computes.
        def __init__(self, inner):
            super().__init__(inner.vocab_size, inner.name, inner.context, inner.unit_type,
                             inner.tokenizer_hash)
            self.inner, self.calls = inner, 0

        def unit_logits(self, unit_ids, lengths):
            self.calls += 1
            return self.inner.unit_logits(unit_ids, lengths)


    init_distributed({})
    out = Path(sys.argv[1])
    teacher = Counting(torch.load(out / "teacher.pt", weights_only=False))
    utterances = json.loads((out / "utterances.json").read_text())
    settings = json.loads((out / "settings.json").read_text())
    header = build_cache(teacher, utterances, out / "cache", progress=False, **settings)
    calls = teacher.calls
    again = build_cache(teacher, utterances, out / "cache", progress=False, **settings)
    try:  # rank 0 finds the mismatch; every rank must raise it, none wait forever
        build_cache(teacher, utterances, out / "cache", progress=False, **{**settings, "tau": 9})
        refused = None
    except CacheMismatchError as error:
        refused = str(error)
    (out / f"rank{rank()}.json").write_text(json.dumps({
        "header": header, "calls": calls, "again": again, "more_calls": teacher.calls - calls,
        "refused": refused}))
    # A clean exit: a rank leaving with its process group alive can abort in gloo's threads.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    """
)


def test_torchrun_ranks_build_their_shards_into_the_same_bytes(one, tmp_path):
    folder, teacher, utterances = one
    torch.save(teacher, tmp_path / "teacher.pt")
    (tmp_path / "utterances.json").write_text(json.dumps(utterances))
    (tmp_path / "settings.json").write_text(json.dumps(SETTINGS))
    worker = tmp_path / "worker.py"
    worker.write_text(TORCHRUN_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(torchrun_command([str(worker), str(tmp_path)]), cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _files(tmp_path / "cache") == _files(folder)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["header"] for r in ranks] == [json.loads((folder / "header.json").read_text())] * 2
    # Rank 0 computed shards 0 and 2 (3 + 2 batches), rank 1 shard 1 (3 batches).
    assert [r["calls"] for r in ranks] == [5, 3]
    # Built again: the complete cache is returned on every rank, nothing recomputed.
    assert [(r["again"], r["more_calls"]) for r in ranks] == [(ranks[0]["header"], 0)] * 2
    assert all("temperature: cache has 1.5" in r["refused"] for r in ranks)
