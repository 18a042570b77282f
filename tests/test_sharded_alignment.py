"""The data chain's corpus steps shard by shard: the same bytes for 1, 2 and 3 processes and
under torchrun, a resumed run rebuilding only the shards that are missing, cut short or from
other settings, and consumers reading one shard at a time."""

import json
import os
import subprocess
import textwrap

import numpy as np
import pytest
import torch
from launch import torchrun_command
from test_units_commands import _manifest

from sb_crossmodal_kd.alignment.aligner_training import train_aligner
from sb_crossmodal_kd.alignment.corpus import (
    align_manifest,
    export_units,
    load_alignments,
    read_manifest,
    save_alignments,
    tree_statistics,
)
from sb_crossmodal_kd.alignment.forced import AlignerSettings, PhoneAligner
from sb_crossmodal_kd.alignment.sharded import (
    align_split,
    export_split_units,
    shard_path,
    split_tree_statistics,
)
from sb_crossmodal_kd.units.lexicon import Lexicon
from sb_crossmodal_kd.units.senones import SenoneTree
from sb_crossmodal_kd.units.store import UnitStore

SHARD = 2  # rows per shard: 7 rows make 4 shards, the last of one row


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """A tiny aligner, a 7-row manifest, and the split aligned by one process."""
    folder = tmp_path_factory.mktemp("sharded")
    rng = np.random.default_rng(0)
    train = _manifest(folder, "train", 10, rng)
    split = _manifest(folder, "split", 7, rng)
    lexicon = Lexicon.load(None, oov_policy="skip")
    aligner = PhoneAligner(lexicon, AlignerSettings(iterations=1, epochs=1, hidden=16,
                                                    init="ctc", ctc_epochs=1))
    aligner.train([(r["ID"], r["wav"], r["wrd"]) for r in read_manifest(train)], progress=False)
    aligner.save(folder / "aligner.pt")
    run = align_one(folder, split, "one", jobs=1)
    return folder, split, lexicon, run


def align_one(folder, split, name, jobs):
    return align_split(folder / "aligner.pt", split, folder / name, oov_policy="skip",
                       jobs=jobs, document=folder / f"{name}.json", header={"manifest": "m"},
                       shard_size=SHARD)


def shard_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.jsonl"))}


def test_shards_and_document_are_the_same_bytes_for_1_2_3_and_many_jobs(aligned):
    folder, split, lexicon, (_, report) = aligned
    assert report["utterances"] == 7 and report["shards_built"] == 4
    assert len(shard_bytes(folder / "one")) == 4
    for jobs in (2, 3, 10):  # 10: more processes than utterances
        align_one(folder, split, f"jobs{jobs}", jobs)
        assert (folder / f"jobs{jobs}.json").read_bytes() == (folder / "one.json").read_bytes()
        assert shard_bytes(folder / f"jobs{jobs}") == shard_bytes(folder / "one")
    # The streamed document is what save_alignments writes for the same alignments.
    header, records = load_alignments(folder / "one.json", lexicon.hash)
    aligner = PhoneAligner.load(folder / "aligner.pt", lexicon)
    found, _ = align_manifest(aligner, read_manifest(split), progress=False)
    save_alignments(folder / "whole.json", found, header)
    assert (folder / "whole.json").read_bytes() == (folder / "one.json").read_bytes()
    assert list(records) == [row["ID"] for row in read_manifest(split)
                             if row["ID"] not in dict(header["report"]["skipped"])]


def test_a_resumed_run_rebuilds_only_the_bad_shards(aligned, tmp_path):
    folder, split, _, _ = aligned
    work = tmp_path / "work"
    work.mkdir()
    for name, data in shard_bytes(folder / "one").items():
        (work / name).write_bytes(data)
    shard_path(work, 1).unlink()  # a crash before shard 1 was written
    cut = shard_path(work, 2).read_bytes()
    shard_path(work, 2).write_bytes(cut[: cut.rindex(b"\n", 0, -1) + 1])  # no end mark
    lines = shard_path(work, 3).read_text().splitlines(keepends=True)
    header = json.loads(lines[0])
    lines[0] = json.dumps({**header, "settings": "another aligner"}) + "\n"
    shard_path(work, 3).write_text("".join(lines))  # other settings: rebuilt, not mixed in
    kept = shard_path(work, 0).stat().st_mtime_ns
    _, report = align_split(folder / "aligner.pt", split, work, oov_policy="skip", jobs=2,
                            document=tmp_path / "resumed.json", header={"manifest": "m"},
                            shard_size=SHARD)
    assert report["shards_built"] == 3
    assert shard_path(work, 0).stat().st_mtime_ns == kept
    assert shard_bytes(work) == shard_bytes(folder / "one")
    assert (tmp_path / "resumed.json").read_bytes() == (folder / "one.json").read_bytes()


def test_tree_statistics_and_unit_store_read_shard_by_shard(aligned, tmp_path):
    folder, split, lexicon, (alignments, _) = aligned
    trees = []
    for jobs in (1, 2):
        stats = split_tree_statistics(alignments, split, folder / "aligner.pt",
                                      oov_policy="skip", jobs=jobs)
        trees.append(SenoneTree.build(stats, max_leaves=300, min_count=5, min_gain=1.0))
    assert trees[0].hash == trees[1].hash
    # The same statistics as one pass over every row (up to the order of float additions).
    aligner = PhoneAligner.load(folder / "aligner.pt", lexicon)
    whole = tree_statistics(alignments, read_manifest(split), aligner.features, 16000,
                            progress=False)
    assert list(whole.stats) == list(stats.stats)
    for key, (count, total, _) in whole.stats.items():
        assert stats.stats[key][0] == count
        assert np.allclose(stats.stats[key][1], total)

    for jobs in (1, 3):
        export_split_units(tmp_path / f"jobs{jobs}.units", alignments, split, lexicon.hash,
                           trees[0], jobs=jobs)
    _, records = load_alignments(folder / "one.json")
    export_units(tmp_path / "whole.units", records, read_manifest(split), lexicon.hash,
                 trees[0], progress=False)
    expected = (tmp_path / "whole.units").read_bytes()
    assert (tmp_path / "jobs1.units").read_bytes() == expected
    assert (tmp_path / "jobs3.units").read_bytes() == expected
    assert not (tmp_path / "jobs3.units.parts").exists()  # the parts are removed
    assert len(UnitStore(tmp_path / "jobs3.units")) == len(records)


TORCHRUN_WORKER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from sb_crossmodal_kd.alignment.sharded import align_split, export_split_units
    from sb_crossmodal_kd.distributed import init_distributed

    init_distributed({})
    folder, split, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    alignments, _ = align_split(folder / "aligner.pt", split, out / "shards", oov_policy="skip",
                                document=out / "ranks.json", header={"manifest": "m"},
                                shard_size=2)
    export_split_units(out / "ranks.units", alignments, split, "lexicon")
    """
)


def test_torchrun_ranks_take_their_shards_and_rank_0_merges(aligned, tmp_path):
    folder, split, _, (alignments, _) = aligned
    worker = tmp_path / "worker.py"
    worker.write_text(TORCHRUN_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(torchrun_command([str(worker), str(folder), str(split), str(tmp_path)]),
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "ranks.json").read_bytes() == (folder / "one.json").read_bytes()
    assert shard_bytes(tmp_path / "shards") == shard_bytes(folder / "one")
    export_split_units(tmp_path / "one.units", alignments, split, "lexicon")
    assert (tmp_path / "ranks.units").read_bytes() == (tmp_path / "one.units").read_bytes()


PHONE_MODEL_SETTINGS = {"iterations": 3, "epochs": 1, "hidden": 16, "ctc_epochs": 1}
REALIGN_SHARD = 3  # 10 utterances: 4 re-alignment shards, twice

PHONE_MODEL_UNDER_TORCHRUN = textwrap.dedent(
    """
    import json, sys
    import torch
    import sb_crossmodal_kd.alignment.aligner_training as training
    from sb_crossmodal_kd.alignment.corpus import read_manifest
    from sb_crossmodal_kd.alignment.forced import AlignerSettings, PhoneAligner
    from sb_crossmodal_kd.distributed import init_distributed, rank
    from sb_crossmodal_kd.units.lexicon import Lexicon

    init_distributed({})
    manifest, out, settings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    aligner = PhoneAligner(Lexicon.load(None, oov_policy="skip"), AlignerSettings(**settings))
    training.train_aligner(aligner, [(r["ID"], r["wav"], r["wrd"]) for r in read_manifest(manifest)],
                           progress=False, shard_size=int(sys.argv[4]))
    torch.save(aligner.state(), f"{out}/rank{rank()}.pt")
    """
)


def _phone_model(manifest, jobs, **settings):
    aligner = PhoneAligner(Lexicon.load(None, oov_policy="skip"),
                           AlignerSettings(**PHONE_MODEL_SETTINGS, **settings))
    train_aligner(aligner, [(r["ID"], r["wav"], r["wrd"]) for r in read_manifest(manifest)],
                  progress=False, jobs=jobs, shard_size=REALIGN_SHARD)
    return aligner.state()


def _same_state(a, b):
    return (a["model"].keys() == b["model"].keys()
            and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
            and torch.equal(a["log_prior"], b["log_prior"]))


def test_the_phone_model_is_the_same_from_two_jobs_and_from_two_ranks(tmp_path):
    # Two jobs are two ranks of this machine; the ranks share the gradient steps (batch
    # parts) and the re-alignments.
    manifest = _manifest(tmp_path, "train", 10, np.random.default_rng(1))
    one = _phone_model(manifest, jobs=1)
    assert _same_state(_phone_model(manifest, jobs=2), one)
    # more jobs than batch parts: 2 ranks, each aligning its shards in 2 processes
    two_parts = _phone_model(manifest, jobs=1, batch_parts=2)
    assert _same_state(_phone_model(manifest, jobs=4, batch_parts=2), two_parts)

    worker = tmp_path / "phone_model.py"
    worker.write_text(PHONE_MODEL_UNDER_TORCHRUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(torchrun_command([str(worker), str(manifest), str(tmp_path),
                                           json.dumps(PHONE_MODEL_SETTINGS),
                                           str(REALIGN_SHARD)]),
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for r in range(2):
        assert _same_state(torch.load(tmp_path / f"rank{r}.pt", weights_only=False), one), r
