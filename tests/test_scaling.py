"""The scaling driver at tiny sizes: first-N train subsets shared by every condition, its
table and plot, a rerun that reuses finished runs, and storing its folder as text."""

import csv
import hashlib
import json

import pytest
from tiny_kd import TINY_MODEL, TINY_PREP

from sb_crossmodal_kd.results_store import store_results
from sb_crossmodal_kd.results_tables import main as print_tables
from sb_crossmodal_kd.scaling import run_scaling, scaling_epochs

PAIRED = (12, 24)
CONDITIONS = ("am_alone", "hierarchy")
STEPS_REFERENCE = 24  # the 12-utterance runs train 2 epochs, the 24-utterance ones 1
PNG = b"\x89PNG\r\n\x1a\n"


def scale(output):
    return run_scaling(output, paired=PAIRED, conditions=CONDITIONS, seeds=1, prep=TINY_PREP,
                       training=TINY_MODEL, steps_reference=STEPS_REFERENCE)


@pytest.fixture(scope="module")
def scaling(tmp_path_factory):
    output = tmp_path_factory.mktemp("scaling")
    return output, scale(output)


def first_ids_digest(output, n):
    """The digest of the first n train utterances of the manifest that have units."""
    from sb_crossmodal_kd.units.store import UnitStore

    store = UnitStore(output / "prep" / "units" / "train.units")
    with open(output / "data" / "train.csv", newline="") as handle:
        ids = [row["ID"] for row in csv.DictReader(handle) if row["ID"] in store]
    return hashlib.sha1("\n".join(sorted(ids[:n])).encode()).hexdigest()[:12]


def test_each_size_trains_every_condition_on_the_first_n_utterances(scaling):
    output, result = scaling
    for n in PAIRED:
        digest = first_ids_digest(output, n)
        assert result["paired"][str(n)]["ids_sha1"] == digest
        assert result["paired"][str(n)]["utterances"] == n
        for name in CONDITIONS:
            run = output / f"paired_{n}" / "runs" / name / "1986"
            log = (run / "log.txt").read_text()
            assert f"train set: {n} utterances (the first {n} of " in log
            assert f"ids sha1 {digest}" in log
            record = json.loads((run / "run.json").read_text())
            assert record["overrides"]["n_train_utterances"] == n
            assert record["epochs"] == scaling_epochs(n, 1, STEPS_REFERENCE) == 24 // n
            assert record["commit"] is None or len(record["commit"]) >= 40
    assert first_ids_digest(output, 12) != first_ids_digest(output, 24)


def test_scaling_writes_json_table_and_plot(scaling):
    output, result = scaling
    assert json.loads((output / "scaling.json").read_text()) == json.loads(json.dumps(result))
    assert result["sizes"] == list(PAIRED) and result["condition_order"] == list(CONDITIONS)
    hours = [result["paired"][str(n)]["hours"] for n in PAIRED]
    assert 0 < hours[0] < hours[1]
    rows = (output / "scaling.md").read_text().splitlines()
    assert rows[0].startswith("| paired utterances | hours | epochs | am_alone WER % |")
    assert [row.split(" | ")[0] for row in rows[2:4]] == ["| 12", "| 24"]
    assert (output / "scaling.png").read_bytes()[:8] == PNG
    # the sizes share one corpus and one set of teachers
    assert not (output / "paired_12" / "data").exists()
    assert not (output / "paired_12" / "prep").exists()


def test_rerun_reuses_every_finished_run(scaling):
    output, result = scaling
    watched = sorted(output.glob("paired_*/runs/*/*/run.json"))
    assert len(watched) == len(PAIRED) * len(CONDITIONS)
    before = [path.stat().st_mtime_ns for path in watched]
    again = scale(output)
    assert [path.stat().st_mtime_ns for path in watched] == before
    assert again["paired"] == result["paired"]


def test_sizes_beyond_the_corpus_fail_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"paired sizes \[12, 31\] exceed the corpus's 30"):
        run_scaling(tmp_path / "x", paired=(12, 31), prep=TINY_PREP)
    with pytest.raises(ValueError, match="Unknown condition 'am_only'"):
        run_scaling(tmp_path / "x", conditions=("am_only",), prep=TINY_PREP)
    assert not (tmp_path / "x").exists()


def test_storing_a_folder_copies_its_text_results_only(scaling, tmp_path, capsys):
    output, _ = scaling
    assert list(output.glob("paired_*/runs/*/*/save/CKPT+*"))  # checkpoints to leave behind
    results = tmp_path / "results"
    store_results(output, results / "scaling", commit="0123abc", command="sbkd demo --scaling")
    stored = sorted(p.relative_to(results / "scaling").as_posix()
                    for p in (results / "scaling").rglob("*") if p.is_file())
    runs = [f"paired_{n}/runs/{name}/1986/run.json" for n in PAIRED for name in CONDITIONS]
    assert set(runs) <= set(stored)
    assert {"scaling.json", "scaling.md", "data/corpus.json", "prep/prep.json"} <= set(stored)
    assert all(name.endswith((".json", ".md")) for name in stored)
    top = json.loads((results / "scaling" / "scaling.json").read_text())
    assert top["provenance"] == {"commit": "0123abc", "command": "sbkd demo --scaling"}
    print_tables([str(results)])
    printed = capsys.readouterr().out
    assert "Not run yet" in printed and "| 12 |" in printed and "| 24 |" in printed
    assert "Run by `sbkd demo --scaling` at commit 0123abc" in printed
    assert (results / "scaling" / "scaling.png").read_bytes()[:8] == PNG
