"""The KD data chain, one epoch of every KD recipe condition, and the ablation driver.

One module fixture runs the real chain (corpus, forced alignment, senone tree, unit stores,
three unit LMs by the LM recipe, teacher caches) and the driver over every condition with a
tiny model for one epoch; the tests then check what each condition trained and what the
driver wrote.
"""

import json
import math
import re
import subprocess
import sys

import pytest
from tiny_kd import TINY_MODEL, TINY_PREP

from sb_crossmodal_kd.ablation import (
    CONDITIONS,
    DENSE_CONDITIONS,
    condition_recipe,
    run_ablation,
)
from sb_crossmodal_kd.io import LOCK_NAME, exclusive_folder
from sb_crossmodal_kd.pipeline import prep_settings, prepare_kd_data

HEAD_TERMS = {"senone", "monophone", "subword"}


def expected_terms(condition):
    """Loss terms each condition must log, from its name alone."""
    family = condition.removesuffix("_moe")
    heads = set()
    if family == "aux_subword":
        heads = {"subword"}
    elif family == "hierarchy_no_lm":  # the same heads on hard labels, no teacher
        return ({"main", "total"} | {f"frame_ce_{head}" for head in HEAD_TERMS}
                | ({"moe"} if condition.endswith("_moe") else set()))
    elif family.startswith("hierarchy"):
        heads = HEAD_TERMS - {family.removeprefix("hierarchy_minus_")}
    terms = {"main", "total"} | {f"kd_{head}" for head in heads}
    if family == "label_interpolation":
        terms.add("li_main")
    if condition.endswith("_moe"):
        terms.add("moe")
    return terms


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    output = tmp_path_factory.mktemp("ablation")
    result = run_ablation(output, seeds=1, prep=TINY_PREP, training=TINY_MODEL)
    return output, result


def logged_terms(run_dir):
    # The first epoch's line of losses (an MoE run logs its expert usage on a line of its own).
    lines = (run_dir / "train_log.txt").read_text().splitlines()
    line = next(line for line in lines if "train loss:" in line)
    return set(re.findall(r"train loss_(\w+):", line))


@pytest.mark.parametrize("condition", CONDITIONS)
def test_each_condition_trains_what_its_name_says(ablation, condition):
    output, result = ablation
    run_dir = output / "runs" / condition / "1986"
    assert logged_terms(run_dir) == expected_terms(condition)
    saved = (run_dir / "hyperparams.yaml").read_text()
    assert f"condition: {condition}" in saved
    record = json.loads((run_dir / "run.json").read_text())
    assert record["epochs"] == 1 and record["test_utterances"] == 4
    assert 0 <= record["wer"] and record["train_s"] > 0
    valid_wer = re.findall(r"valid WER: ([0-9.e+]+)", (run_dir / "train_log.txt").read_text())
    curve = record["valid_wer_curve"]  # one value per epoch, as logged (to 3 digits there)
    assert len(curve) == len(valid_wer) == 1
    assert all(abs(c - float(w)) <= 0.01 * max(1.0, c) for c, w in zip(curve, valid_wer, strict=True))
    entry = result["conditions"][condition]
    assert entry["wer"] == [record["wer"]] and entry["params"] == record["params"]


def test_learning_rate_decays_to_zero_at_the_last_step(ablation):
    """The schedule's length comes from the train loader: it ends exactly at the last batch."""
    output, _ = ablation
    log = (output / "runs" / "am_alone" / "1986" / "train_log.txt").read_text()
    assert float(re.findall(r"lr: ([0-9.e+-]+)", log)[-1]) == 0.0
    run_log = (output / "runs" / "am_alone" / "1986" / "log.txt").read_text()
    assert "valid WER by epoch" in run_log


def test_heads_are_trained_but_not_counted_and_moe_adds_experts(ablation):
    _, result = ablation
    entries = result["conditions"]
    for name in DENSE_CONDITIONS:
        entry = entries[name]
        has_heads = name in {"aux_subword"} or name.startswith("hierarchy")
        assert (entry["params_with_heads"] > entry["params"]) == has_heads
        assert entry["params"] == entries["am_alone"]["params"]  # the same inference model
        assert entries[f"{name}_moe"]["params"] > entry["params"]


def test_driver_writes_json_table_and_plot(ablation):
    output, result = ablation
    on_disk = json.loads((output / "ablation.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert on_disk["condition_order"] == list(CONDITIONS) and on_disk["seeds"] == [1986]
    for name in CONDITIONS:
        entry = on_disk["conditions"][name]
        for key in ("wer_mean", "wer_std", "cer_mean", "cer_std", "train_s", "params",
                    "per_seed", "delta_wer_mean"):
            assert key in entry, (name, key)
        assert entry["wer_std"] is None  # one seed: no spread to report
        assert entry["reference"] == ("am_alone_moe" if name.endswith("_moe") else "am_alone")
    table = (output / "ablation.md").read_text().splitlines()
    assert table[0].startswith("| condition | WER % | CER %")
    assert [row.split(" | ")[0][2:] for row in table[2:2 + len(CONDITIONS)]] == list(CONDITIONS)
    assert (output / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chain_outputs_agree_on_units(ablation):
    from sb_crossmodal_kd.teachers.cache import TeacherCache
    from sb_crossmodal_kd.units.store import UnitStore
    from sb_crossmodal_kd.units.subwords import SentencePieceUnits

    output, result = ablation
    prep = output / "prep"
    store = UnitStore(prep / "units" / "train.units")
    tokenizer = SentencePieceUnits(str(prep / "tokenizer"), TINY_PREP["vocab_size"])
    assert store.header["tokenizer"] == tokenizer.hash  # the CTC output's tokenizer
    lm = json.loads((prep / "lm" / "subword" / "results.json").read_text())
    assert lm["units_hash"] == tokenizer.hash
    for unit in ("subword", "monophone", "senone"):
        cache = TeacherCache(prep / "caches" / f"{unit}_train")
        assert len(cache) == len(store)
        for utt_id in store.ids()[:3]:
            assert cache.length(utt_id) == len(store[utt_id][f"{unit}.units"])
    assert result["n_senones"] == TeacherCache(prep / "caches" / "senone_train").vocab_size
    for unit in ("subword", "monophone", "senone"):  # each teacher's convergence and sharpness
        lm = json.loads((prep / "lm" / unit / "results.json").read_text())
        teacher = result["teachers"][unit]
        assert len(lm["valid_ppl_curve"]) == lm["epochs"] == TINY_PREP["lm"]["number_of_epochs"]
        assert teacher["valid_ppl"] == lm["valid_ppl"] and teacher["valid_ppl_curve"] == lm[
            "valid_ppl_curve"]
        vocab = TeacherCache(prep / "caches" / f"{unit}_train").vocab_size
        assert 0 < teacher["mean_entropy"] <= math.log(vocab) and 0 < teacher["mean_top1"] <= 1
        assert f"| {unit} | {lm['valid_ppl']} |" in (output / "ablation.md").read_text()


def test_rerun_skips_finished_work_and_refuses_other_settings(ablation):
    output, result = ablation
    watched = [output / "runs" / name / "1986" / "run.json" for name in CONDITIONS]
    watched += [output / "prep" / "align" / "aligner.pt",
                output / "prep" / "lm" / "senone" / "results.json",
                output / "prep" / "caches" / "senone_train" / "header.json"]
    before = {path: path.stat().st_mtime_ns for path in watched}
    again = run_ablation(output, seeds=1, prep=TINY_PREP, training=TINY_MODEL)
    assert {path: path.stat().st_mtime_ns for path in watched} == before
    assert again["conditions"] == result["conditions"]
    with pytest.raises(FileExistsError, match="differs in: vocab_size"):
        prepare_kd_data(output / "data", output / "prep",
                        prep_settings(**{**TINY_PREP, "vocab_size": 33}))
    # A finished run trained with other settings is refused before anything trains.
    with pytest.raises(FileExistsError, match=r"run\.json: this run was made .*differs in: lr"):
        run_ablation(output, seeds=1, prep=TINY_PREP, training={**TINY_MODEL, "lr": 0.123})
    assert {path: path.stat().st_mtime_ns for path in watched} == before


def test_unknown_condition_fails_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="Unknown condition 'hierarchy_minus_lexicon'"):
        run_ablation(tmp_path / "x", conditions=["am_alone", "hierarchy_minus_lexicon"])
    assert not (tmp_path / "x").exists()
    assert condition_recipe("am_alone_moe")[1] == {"condition": "am_alone_moe", "use_moe": True}


HOLDER = """
import sys, time
from sb_crossmodal_kd.io import exclusive_folder

with exclusive_folder(sys.argv[1]):
    print("holding", flush=True)
    time.sleep(600)
"""


def test_a_second_driver_on_a_busy_folder_is_refused_before_any_work(tmp_path):
    # Two drivers on one folder would train the same runs at once; a killed one lets go.
    output = tmp_path / "study"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(output)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        cli = subprocess.run([sys.executable, "-m", "sb_crossmodal_kd.cli", "demo", "--output",
                              str(output)], capture_output=True, text=True, timeout=120)
        assert cli.returncode == 2 and cli.stdout == ""
        assert cli.stderr.strip().splitlines() == [
            f"sbkd demo: error: {output} is in use by pid {holder.pid}, which is still running "
            "on it: wait for it to finish (a rerun then resumes) or stop it, or give another "
            "folder"]
        assert sorted(p.name for p in output.iterdir()) == [LOCK_NAME]  # nothing was done
    finally:
        holder.kill()
        holder.wait()
    with exclusive_folder(output):  # the killed holder's lock went with it
        pass


def test_cli_prints_the_table_of_finished_runs(ablation, capsys):
    from sb_crossmodal_kd.cli import main

    output, _ = ablation
    main(["ablation", "--output", str(output), "--conditions", "am_alone", "hierarchy",
          "--epochs", "1", "--training", json.dumps(TINY_MODEL), "--prep",
          json.dumps(TINY_PREP)])
    printed = capsys.readouterr().out
    assert "| am_alone |" in printed and "| hierarchy |" in printed
    assert "| aux_subword |" not in printed
    # where it ran, as `sbkd demo` records it (results_store reads it)
    ran = json.loads((output / "ablation.json").read_text())["ran"]
    assert ran["device"] == "cpu" and ran["cpus"] >= 1 and ran["commit"]


def test_interrupted_runs_resume_from_their_checkpoint_side_by_side(ablation):
    output, result = ablation
    # hierarchy_no_lm reads no teacher: it is sent to the workers before the LM step
    redo = ["aux_subword", "hierarchy_moe", "hierarchy_no_lm"]
    for name in redo:  # as if stopped after training, before the record was written
        (output / "runs" / name / "1986" / "run.json").unlink()
    again = run_ablation(output, seeds=1, prep=TINY_PREP, training=TINY_MODEL, jobs=3)
    for name in redo:
        record = json.loads((output / "runs" / name / "1986" / "run.json").read_text())
        assert record["wer"] == result["conditions"][name]["wer"][0]  # the same trained model
        assert len(record["valid_wer_curve"]) == 1  # the curve comes back from the checkpoint
        log = (output / "runs" / name / "1986" / "train_log.txt").read_text()
        assert log.count("epoch: 1,") == 1  # not trained again
    assert again["conditions"]["am_alone"] == result["conditions"]["am_alone"]


def test_only_the_conditions_without_teachers_train_before_the_unit_lms(ablation):
    # They start while the LMs train, so they must not open a teacher cache.
    from sb_crossmodal_kd.ablation import _reads_teachers

    output, _ = ablation
    common = {"data_folder": str(output / "data"), "prep_folder": str(output / "prep"),
              "vocab_size": TINY_PREP["vocab_size"], **TINY_MODEL}
    without = {name for name in CONDITIONS if not _reads_teachers(name, common)}
    assert without == {"am_alone", "hierarchy_no_lm", "am_alone_moe", "hierarchy_no_lm_moe"}


def test_a_resumed_run_is_flagged_as_partly_timed():
    from sb_crossmodal_kd.ablation import markdown_table, summarize

    records = {("am_alone", 1): {"wer": 40.0, "cer": 20.0, "train_s": 100, "params": 5},
               ("am_alone", 2): {"wer": 42.0, "cer": 21.0, "train_s": 9, "params": 5,
                                 "resumed": True},
               ("hierarchy", 1): {"wer": 38.0, "cer": 19.0, "train_s": 110, "params": 5},
               ("hierarchy", 2): {"wer": 39.0, "cer": 20.0, "train_s": 111, "params": 5}}
    summary = summarize(records, ["am_alone", "hierarchy"], [1, 2])
    assert summary["am_alone"]["train_s_partial"]
    assert not summary["hierarchy"]["train_s_partial"]
    rows = markdown_table(summary, [1, 2]).splitlines()
    assert "| 54* |" in rows[2] and "| 110 |" in rows[3]
    assert rows[-1].startswith("* includes a run resumed")
