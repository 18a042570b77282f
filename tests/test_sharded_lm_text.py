"""The unit LMs' text converted shard by shard: the same files and sequences for 1, 2 and more
processes than shards and under torchrun, the sequences and OOV counts of the one-process
``convert``, a re-run converting only the shards missing, cut short or made otherwise, and a
text with nothing to train on refused by name.

The converters are the package's own unit types (monophones of a small lexicon that skips
unknown words, senones of a tree built here), so spawned workers unpickle them."""

import json
import os
import shutil
import subprocess
import textwrap

import pytest
import torch
from launch import torchrun_command

from sb_crossmodal_kd.teachers.lm_training import convert, train_unit_lm
from sb_crossmodal_kd.teachers.text_shards import convert_sharded
from sb_crossmodal_kd.units.lexicon import Lexicon
from sb_crossmodal_kd.units.types import TextUnits

WORDS = {"turn": [["T", "ER1", "N"]], "on": [["AA1", "N"]], "off": [["AO1", "F"]],
         "the": [["DH", "AH0"]], "lights": [["L", "AY1", "T", "S"]]}
# 23 lines in shards of 5: 5 shards, the last of 3 lines; blank lines and sentences with an
# unknown word ("oven", "please") among them.
LINES = ["turn on the lights", "turn off", "", "the oven", "on", "lights on", "turn the lights off",
         "please", "off", "", "on off on", "the lights", "turn", "turn on", "off the oven",
         "lights", "on the", "", "turn off the lights", "the", "please turn on", "on on",
         "off off"]
SHARD_SIZE = 5


def _monophones():
    return TextUnits("monophone", lexicon=Lexicon(WORDS, name="toy"))


def _senones():
    from sb_crossmodal_kd.units.senones import SenoneTree, TriphoneStats

    stats = TriphoneStats(dim=2)
    generator = torch.Generator().manual_seed(0)
    for triphone in (["T", "ER", "N"], ["L", "AY", "T"], ["DH", "AH", "AO"]):
        stats.add(triphone, [0] * 9 + [1] * 9 + [2] * 9, torch.randn(27, 2, generator=generator))
    tree = SenoneTree.build(stats, max_leaves=200, min_count=2, min_gain=1.0)
    return TextUnits("senone", lexicon=Lexicon(WORDS, name="toy"), tree=tree)


def _files(folder):
    """Every file of a shards folder (shards, anything left over), by name."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """The text, and its shards converted by one process: folder, sequences, skipped."""
    root = tmp_path_factory.mktemp("lm_text")
    text = root / "train.txt"
    text.write_text("\n".join(LINES) + "\n")
    sequences, skipped = convert_sharded(text, _monophones(), root / "one",
                                         shard_size=SHARD_SIZE)
    return text, root / "one", sequences, skipped


def test_the_sequences_and_oov_counts_of_the_one_process_convert(one):
    text, folder, sequences, skipped = one
    assert (sequences, skipped) == convert(text, _monophones())
    assert skipped == 4 and len(sequences) == 16
    assert sorted(_files(folder)) == [f"shard_{i:05d}.{ext}" for i in range(5)
                                      for ext in ("bin", "json")]
    last = json.loads((folder / "shard_00004.json").read_text())
    assert last["lines"] == [20, 23] and last["sentences"] == 2 and last["skipped_oov"] == 1
    senones = _senones()
    assert (convert_sharded(text, senones, text.parent / "senone", shard_size=3)
            == convert(text, senones))


def test_the_same_files_for_2_and_more_jobs_than_shards(one, tmp_path):
    text, folder, sequences, skipped = one
    for jobs in (2, 7):  # 7: more processes than the 5 shards
        assert convert_sharded(text, _monophones(), tmp_path / f"jobs{jobs}", jobs=jobs,
                               shard_size=SHARD_SIZE) == (sequences, skipped)
        assert _files(tmp_path / f"jobs{jobs}") == _files(folder)


def test_a_rerun_converts_only_the_shards_missing_cut_or_made_otherwise(one, tmp_path):
    text, folder, sequences, skipped = one
    work = tmp_path / "work"
    shutil.copytree(folder, work)
    (work / "shard_00001.bin").unlink()
    cut = (work / "shard_00002.bin").read_bytes()
    (work / "shard_00002.bin").write_bytes(cut[: len(cut) // 2])
    other = json.loads((work / "shard_00003.json").read_text())  # intact, from other units
    (work / "shard_00003.json").write_text(json.dumps({**other, "units_hash": "other"}))
    (work / ".shard_00004.bin.x.tmp").write_bytes(b"left by an interrupted write")
    kept = {name: (work / name).stat().st_mtime_ns for name in (
        "shard_00000.bin", "shard_00000.json", "shard_00004.bin", "shard_00004.json")}
    assert convert_sharded(text, _monophones(), work, shard_size=SHARD_SIZE) == (sequences,
                                                                                 skipped)
    assert _files(work) == _files(folder)
    assert {name: (work / name).stat().st_mtime_ns for name in kept} == kept
    for name in ("shard_00001.json", "shard_00002.json", "shard_00003.json"):
        assert (work / name).stat().st_mtime_ns != (folder / name).stat().st_mtime_ns


def test_another_shard_size_or_text_rebuilds_every_shard(one, tmp_path):
    text, folder, sequences, skipped = one
    work = tmp_path / "work"
    shutil.copytree(folder, work)
    assert convert_sharded(text, _monophones(), work, shard_size=10) == (sequences, skipped)
    convert_sharded(text, _monophones(), tmp_path / "ten", shard_size=10)
    assert _files(work) == _files(tmp_path / "ten")  # shards 3 and 4 of the old layout gone
    longer = tmp_path / "longer.txt"
    longer.write_text(text.read_text() + "turn on\n")
    more, _ = convert_sharded(longer, _monophones(), work, shard_size=10)
    assert more == [*sequences, _monophones()("turn on")] and json.loads(
        (work / "shard_00000.json").read_text())["text_lines"] == 24


def test_a_text_with_nothing_to_train_on_is_refused_by_name(tmp_path):
    for name, content in (("empty.txt", "\n\n"), ("oov.txt", "oven\nplease oven\n")):
        (tmp_path / name).write_text(content)
        with pytest.raises(ValueError, match=f"{name} gives no monophone sentences"):
            convert_sharded(tmp_path / name, _monophones(), tmp_path / "out", shard_size=1)
    with pytest.raises(ValueError, match="jobs must be a positive number"):
        convert_sharded(tmp_path / "oov.txt", _monophones(), tmp_path / "jobs", jobs=0)
    with pytest.raises(FileNotFoundError, match="missing.txt not found"):
        convert_sharded(tmp_path / "missing.txt", _monophones(), tmp_path / "out")
    assert not (tmp_path / "jobs").exists()


def test_train_unit_lm_trains_on_the_same_sequences_for_any_conversion_jobs(tmp_path):
    from sb_crossmodal_kd.hparams import UNIT_LMS

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.txt").write_text("\n".join(LINES * 2) + "\n")
    (tmp_path / "data" / "valid.txt").write_text("\n".join(LINES[:6]) + "\n")
    results = {}
    for jobs in (1, 2):
        overrides = {"data_folder": str(tmp_path / "data"),
                     "train_text": str(tmp_path / "data" / "train.txt"),
                     "valid_text": str(tmp_path / "data" / "valid.txt"),
                     "output_folder": str(tmp_path / f"lm{jobs}"), "number_of_epochs": 1,
                     "text_shard_size": 16, "conversion_jobs": jobs}
        results[jobs] = train_unit_lm(UNIT_LMS / "monophone.yaml", overrides,
                                      {"device": "cpu"})
    train, train_skipped = convert(tmp_path / "data" / "train.txt", _cmudict_monophones())
    valid, valid_skipped = convert(tmp_path / "data" / "valid.txt", _cmudict_monophones())
    counted = {key: results[1][key] for key in ("train_sentences", "train_units",
                                                "valid_sentences", "skipped_oov_sentences")}
    assert counted == {"train_sentences": len(train), "train_units": sum(map(len, train)),
                       "valid_sentences": len(valid),
                       "skipped_oov_sentences": train_skipped + valid_skipped}
    assert results[2] == results[1]  # the same sequences in the same order: the same training
    assert _files(tmp_path / "lm1" / "text_units" / "train") == _files(
        tmp_path / "lm2" / "text_units" / "train")
    assert len(list((tmp_path / "lm2" / "text_units" / "train").glob("*.bin"))) == 3


def _cmudict_monophones():
    return TextUnits.from_files("monophone", oov_policy="g2p")


TORCHRUN_WORKER = textwrap.dedent(
    """
    import json
    import sys
    from pathlib import Path

    import torch

    from sb_crossmodal_kd.distributed import init_distributed, rank
    from sb_crossmodal_kd.units.lexicon import Lexicon
    from sb_crossmodal_kd.units.types import TextUnits
    from sb_crossmodal_kd.teachers import text_shards

    init_distributed({})
    out = Path(sys.argv[1])
    units = TextUnits("monophone", lexicon=Lexicon(json.loads(sys.argv[2]), name="toy"))
    converted = []
    real = text_shards._convert_shard

    def counting(*args):  # which shards this rank converts
        converted.append(args[2])
        return real(*args)

    text_shards._convert_shard = counting
    first = text_shards.convert_sharded(out / "train.txt", units, out / "shards", shard_size=5)
    again = text_shards.convert_sharded(out / "train.txt", units, out / "shards", shard_size=5)
    (out / f"rank{rank()}.json").write_text(json.dumps(
        {"first": first, "again": again, "converted": converted}))
    # A clean exit: a rank leaving with its process group alive can abort in gloo's threads.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    """
)


def test_torchrun_ranks_convert_their_shards_into_the_same_files(one, tmp_path):
    text, folder, sequences, skipped = one
    shutil.copy(text, tmp_path / "train.txt")
    worker = tmp_path / "worker.py"
    worker.write_text(TORCHRUN_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(torchrun_command([str(worker), str(tmp_path), json.dumps(WORDS)]),
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _files(tmp_path / "shards") == _files(folder)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["converted"] for r in ranks] == [[0, 2, 4], [1, 3]]  # none twice, on rerun none
    assert all(r["first"] == r["again"] == [sequences, skipped] for r in ranks)


@pytest.mark.parametrize(("cores", "jobs", "expected"), [(None, None, 2), (8, 1, 1), (8, 6, 2),
                                                         (2, 16, 1)])
def test_the_chain_gives_each_lm_its_share_of_cores_and_jobs(tmp_path, monkeypatch, cores,
                                                             jobs, expected):
    from concurrent.futures import Future

    import sb_crossmodal_kd.workers
    from sb_crossmodal_kd.prep import unit_lms

    submitted = []

    class Pool:  # runs nothing: records what each LM would be trained with
        def __init__(self, workers, threads):
            self.workers = workers

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, function, hparams, overrides, run_opts, conversion_jobs):
            submitted.append((self.workers, conversion_jobs))
            folder = tmp_path / "prep" / "lm" / os.path.basename(overrides["output_folder"])
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "results.json").write_text("{}")
            done = Future()
            done.set_result({})
            return done

    monkeypatch.setattr(sb_crossmodal_kd.workers, "process_pool", Pool)
    monkeypatch.setattr(os, "cpu_count", lambda: 7)
    texts = {"train": tmp_path / "train.txt", "valid": tmp_path / "valid.txt"}
    unit_lms._unit_lms(tmp_path / "prep", texts, {"lm": {}}, 64, "cpu", cores, jobs)
    # 3 LMs side by side (at most `cores`): the fewer of cores (7 here) and jobs, shared out.
    assert {entry[1] for entry in submitted} == {expected} and len(submitted) == 3


def test_the_lm_reads_a_large_text_from_its_shards_without_holding_it(tmp_path):
    import tracemalloc

    from sb_crossmodal_kd.teachers.lm_training import UnitSentences, sentence_lengths
    from sb_crossmodal_kd.teachers.text_shards import TextShards, convert_to_shards

    text = tmp_path / "large.txt"
    text.write_text("\n".join(LINES * 2000) + "\n")  # 46,000 lines, 32,000 sentences
    expected, skipped = convert(text, _monophones())
    shards, again = convert_to_shards(text, _monophones(), tmp_path / "units", shard_size=5000)
    assert isinstance(shards, TextShards) and again == skipped
    assert len(shards) == len(expected) and shards[:] == expected
    assert shards[-1] == expected[-1] and shards[12345] == expected[12345]
    assert sentence_lengths(shards).tolist() == [len(s) for s in expected]
    head = shards.first(7000)  # max_train_sentences: across a shard boundary
    assert len(head) == 7000 and head[6999] == expected[6999]
    with pytest.raises(IndexError):
        shards[len(expected)]
    # Opening the converted text again and reading every sentence, as an epoch does, holds
    # a few shards' offsets, not the text (as lists it is 28 bytes a unit and more).
    listed_bytes = sum(len(s) for s in expected) * 28
    tracemalloc.start()
    items = UnitSentences(convert_to_shards(text, _monophones(), tmp_path / "units",
                                            shard_size=5000)[0])
    total = sum(int(items[i]["units"].sum()) for i in range(len(items)))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert total == sum(sum(s) for s in expected)
    assert peak < listed_bytes / 20, (peak, listed_bytes)
