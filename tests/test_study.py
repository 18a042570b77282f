"""The study presets at tiny sizes: the study preset's resume and refusal, the long
preset, and README's tables from hand-written result files."""

import json

import pytest
from tiny_kd import TINY_MODEL, TINY_PREP

from sb_crossmodal_kd import demo
from sb_crossmodal_kd.ablation import summarize
from sb_crossmodal_kd.decoding import tuning
from sb_crossmodal_kd.results_store import store_results
from sb_crossmodal_kd.results_tables import main as print_tables

PNG = b"\x89PNG\r\n\x1a\n"


def test_study_preset_resumes_and_refuses_a_folder_of_other_settings(tmp_path, monkeypatch):
    from sb_crossmodal_kd.io import OtherSettingsError

    monkeypatch.setattr(demo, "STUDY_PREP", TINY_PREP)
    monkeypatch.setattr(demo, "STUDY_TRAINING", TINY_MODEL)
    monkeypatch.setattr(demo, "STUDY_CONDITIONS", ("am_alone",))
    # Narrow beams: an untrained model's flat posteriors make wide ones slow, not different
    monkeypatch.setattr(tuning, "DEFAULT_BEAM_WIDTHS", (2, 4))
    output = tmp_path / "study"
    result = demo.run_demo(output, preset="study", seeds=2, jobs=1, progress=False,
                           command="sbkd demo --study")
    assert result["seeds"] == [1986, 1987] and result["ran"]["command"] == "sbkd demo --study"
    # the decoding rows: each model greedy and with the n-gram LM, its settings from valid
    decoding = json.loads((output / "decoding.json").read_text())
    assert [(row["condition"], row["decoding"]) for row in decoding["rows"]] == [
        ("am_alone", "greedy"), ("am_alone", "lm")]
    for run in decoding["runs"]:
        trained = json.loads((output / "runs" / "am_alone" / str(run["seed"]) / "run.json")
                             .read_text())
        assert abs(run["greedy"]["wer"] - trained["wer"]) < 5  # the same model, rebatched
        assert run["chosen"] in run["valid_grid"] and len(run["valid_grid"]) == 14
        assert run["chosen"]["wer"] == min(row["wer"] for row in run["valid_grid"])
        assert run["lm"]["rtf"] > run["lm"]["search_rtf"] > 0 and run["test_audio_s"] > 0
    assert "| am_alone | + 3-gram LM beam search |" in (output / "decoding.md").read_text()
    watched = sorted(output.glob("runs/*/*/run.json")) + sorted(
        output.glob("decoding/*/*/decoding.json"))
    before = [path.stat().st_mtime_ns for path in watched]
    assert len(watched) == 4
    again = demo.run_demo(output, preset="study", seeds=2, jobs=1, progress=False)
    assert [path.stat().st_mtime_ns for path in watched] == before
    assert again["conditions"] == result["conditions"]
    with pytest.raises(OtherSettingsError, match="differs in"):
        demo.run_demo(output, preset="demo", jobs=1, progress=False)  # PREP_DEFAULTS' corpus
    assert [path.stat().st_mtime_ns for path in watched] == before


def test_presets_default_to_folders_of_their_own_and_check_their_options():
    from sb_crossmodal_kd.cli import main

    assert len({demo.default_output(preset) for preset in demo.PRESETS}) == 4
    assert demo.STUDY_TRAINING == demo.LONG_TRAINING
    assert demo.LONG_TRAINING == {**demo.DEMO_TRAINING, "number_of_epochs": 40}
    assert demo.STUDY_PREP["corpus"]["n_text"] >= 50000
    assert demo.SCALING_PREP["corpus"]["n_train"] == 2400
    with pytest.raises(ValueError, match="--paired goes with --scaling"):
        main(["demo", "--study", "--paired", "150,600"])
    with pytest.raises(ValueError, match="--paired takes positive integers"):
        main(["demo", "--scaling", "--paired", "150,0"])
    with pytest.raises(SystemExit):
        main(["demo", "--study", "--scaling"])
    with pytest.raises(SystemExit):
        main(["demo", "--long", "--study"])


def test_long_preset_trains_the_demo_conditions_to_its_own_epochs(tmp_path, monkeypatch):
    from sb_crossmodal_kd.io import OtherSettingsError

    monkeypatch.setattr(demo, "LONG_PREP", TINY_PREP)
    monkeypatch.setattr(demo, "LONG_TRAINING", {**TINY_MODEL, "number_of_epochs": 2})
    monkeypatch.setattr(demo, "DEMO_CONDITIONS", ("am_alone",))
    output = tmp_path / "long"
    result = demo.run_demo(output, preset="long", jobs=1, progress=False,
                           command="sbkd demo --long")
    run = result["conditions"]["am_alone"]["per_seed"]["1986"]
    assert result["seeds"] == [1986] and result["ran"]["command"] == "sbkd demo --long"
    assert run["epochs"] == 2 and len(run["valid_wer_curve"]) == 2
    with pytest.raises(OtherSettingsError, match="differs in"):
        demo.run_demo(output, preset="demo", jobs=1, progress=False)  # the demo's epochs


def hand_records():
    """Two seeds of the claim's conditions, with WERs chosen to test each verdict."""
    wers = {"am_alone": (40.0, 44.0), "label_interpolation": (41.0, 43.0),
            "aux_subword": (39.0, 43.0), "hierarchy": (37.0, 42.0),
            "hierarchy_no_lm": (38.0, 43.0)}
    curve = [90.0, 60.0, 50.0, 45.0, 44.0, 44.0, 43.5, 43.0]
    return {(name, seed): {"wer": wer, "cer": wer / 4, "train_s": 10, "params": 5,
                           "epochs": len(curve), "commit": "f" * 40,
                           "valid_wer_curve": curve if name != "hierarchy" or seed == 1
                           else [90.0, 60.0, 50.0, 40.0]}
            for name, pair in wers.items() for seed, wer in zip((1, 2), pair, strict=True)}, \
        list(wers)


def printed_tables(results, name, result, capsys):
    """What the tables script prints for ``results`` with ``result`` stored as ``name``."""
    (results / name).parent.mkdir(parents=True)
    (results / name).write_text(json.dumps(result))
    print_tables([str(results)])
    return capsys.readouterr().out


def test_readme_tables_from_hand_written_results(tmp_path, capsys):
    records, names = hand_records()
    study = {"conditions": summarize(records, names, [1, 2]), "condition_order": names,
             "seeds": [1, 2], "settings": {"device": "cpu"},
             "ran": {"device": "cpu", "cpus": 2, "gpu": None},
             "provenance": {"commit": "f" * 40, "command": "sbkd demo --study"}}
    printed = printed_tables(tmp_path, "study/ablation.json", study, capsys)
    # hierarchy − am_alone, seed by seed: 37 − 40, 42 − 44 → −2.5 ± 0.71
    assert "| hierarchy | 39.50 ± 3.54 | 9.88 ± 0.88 | -2.50 ± 0.71 |" in printed
    assert "- hierarchy < aux_subword: Δ -1.50 ± 0.71 (2 of 2 seeds): holds" in printed
    assert ("- aux_subword < label_interpolation: Δ -1.00 ± 1.41 (1 of 2 seeds): holds on the "
            "mean, not in every seed") in printed
    assert ("- label_interpolation < am_alone: Δ +0.00 ± 1.41 (1 of 2 seeds): does not hold"
            in printed)
    # the LM's share: 37 − 38, 42 − 43 → −1 ± 0, 40 % of the hierarchy's −2.5
    assert ("- the LM's own share, hierarchy − hierarchy_no_lm: Δ -1.00 ± 0.00 (2 of 2 seeds "
            "below), 40 % of the hierarchy's -2.50 over the AM alone") in printed
    assert "| hierarchy | 2.3 % (1.1 %) | 20.0 % ✗ |" in printed  # trend: 43.5 → 43.0
    assert "1 of 10 runs not flat" in printed
    assert "runs: ffffffffffff × 10) on cpu, 2 CPUs." in printed
    assert "### Scarce paired data (`sbkd demo --scaling`)\n\nNot run yet" in printed
    assert "### The demo trained longer (`sbkd demo --long`)\n\nNot run yet" in printed
    # the long demo's results print as the study's do, in a section of their own
    long = printed_tables(tmp_path, "long/ablation.json", study, capsys)
    section = long.split("### The study")[0]
    assert "| hierarchy | 39.50 ± 3.54 | 9.88 ± 0.88 | -2.50 ± 0.71 |" in section
    assert "1 of 10 runs not flat" in section
    assert "at 40 and 80 epochs" not in long
    # and beside them, the same conditions trained longer, seed by seed
    longer = {**study, "settings": {"training": {"number_of_epochs": 80}},
              "conditions": {name: {"per_seed": {"2": {**entry["per_seed"]["2"], "wer": 30.0}}}
                             for name, entry in study["conditions"].items()
                             if name in ("am_alone", "hierarchy")}}
    study["settings"]["training"] = {"number_of_epochs": 40}
    (tmp_path / "long" / "ablation.json").write_text(json.dumps(study))
    both = printed_tables(tmp_path, "long_80_epochs/ablation.json", longer, capsys)
    section = both.split("### The long demo's conditions at 40 and 80 epochs")[1]
    assert "| am_alone | 40 | 2 | 44.00 | 43.00 (8) | 2.3 % (1.1 %) |" in section
    assert "| am_alone | 80 | 2 | 30.00 | 43.00 (8) | 2.3 % (1.1 %) |" in section
    assert "- 40 epochs: hierarchy − am_alone -2.00" in section
    assert "- 80 epochs: hierarchy − am_alone +0.00" in section
    # the study's conditions trained longer have a section of their own, after the study's
    (tmp_path / "study" / "ablation.json").write_text(json.dumps(study))
    longest = {**longer, "settings": {"training": {"number_of_epochs": 120}}}
    every = printed_tables(tmp_path, "study_120_epochs/ablation.json", longest, capsys)
    assert every.index("### The study (") < every.index("### The study's conditions at 40 and "
                                                        "120 epochs")
    section = every.split("### The study's conditions at 40 and 120 epochs")[1]
    assert "| am_alone | 120 | 2 | 30.00 | 43.00 (8) | 2.3 % (1.1 %) |" in section
    assert "- 120 epochs: hierarchy − am_alone +0.00" in section
    assert "| aux_subword |" not in section  # not trained at 120 epochs
    # the hierarchy's valid lead along training, at each budget, over the seeds both ran
    assert "| epochs | hierarchy − | 1st ¼ | 2nd ¼ | 3rd ¼ | last ¼ |" in section
    assert "| 40 | am_alone |" in section and "| 120 | am_alone |" in section


def test_scaling_table_finds_where_the_gain_is_largest(tmp_path, capsys):
    records, _ = hand_records()
    names = ["am_alone", "hierarchy", "hierarchy_no_lm"]

    def size(n, hours, shift):
        shifted = {key: {**r, "wer": r["wer"] + (shift if key[0] == "am_alone" else 0)}
                   for key, r in records.items() if key[0] in names}
        return {"utterances": n, "hours": hours, "epochs": 18,
                "conditions": summarize(shifted, names, [1, 2])}

    scaling = {"sizes": [150, 600], "condition_order": names, "seeds": [1, 2],
               "paired": {"150": size(150, 0.12, 10.0), "600": size(600, 0.5, 0.0)},
               "provenance": {"commit": "abc", "command": "sbkd demo --scaling"}}
    printed = printed_tables(tmp_path, "scaling/scaling.json", scaling, capsys)
    # at 150 the AM alone is 10 points worse: hierarchy − am_alone = −12.5 ± 0.71
    assert "| 150 | 0.12 | 18 | 52.00 ± 2.83 | 39.50 ± 3.54 | 40.50 ± 3.54 |" in printed
    assert "| -12.50 ± 0.71 | -11.50 ± 0.71 | -1.00 ± 0.00 | 20.0 % |" in printed
    assert "largest at 150 paired utterances (0.12 h): -12.50 WER points" in printed
    assert (tmp_path / "scaling" / "scaling.png").read_bytes()[:8] == PNG


def test_decoding_rows_need_a_finished_study(tmp_path):
    from sb_crossmodal_kd.shallow_fusion import run_shallow_fusion

    (tmp_path / "data" / "lm_text").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"not a finished study for decoding: missing "
                       r".*lm_text/train.txt"):
        run_shallow_fusion(tmp_path, [1986])
    assert not (tmp_path / "decoding").exists()


def test_a_stopped_study_has_the_table_of_its_finished_seeds(tmp_path, capsys):
    from sb_crossmodal_kd.ablation import write_ablation_result

    def run(wer, seed):
        return {"wer": wer, "cer": wer / 2, "train_s": 10.0, "params": 5, "epochs": 4,
                "valid_wer_curve": [90.0, 50.0, 45.0, 44.9], "commit": "c" * 40, "seed": seed}

    conditions, seeds = ["am_alone", "hierarchy"], [1986, 1987]
    records = {("am_alone", 1986): run(40.0, 1986), ("hierarchy", 1986): run(30.0, 1986),
               ("am_alone", 1987): run(41.0, 1987)}  # hierarchy, seed 1987: still running
    study = tmp_path / "study"
    assert write_ablation_result(study, {("am_alone", 1986): records[("am_alone", 1986)]},
                                 conditions, seeds, {}, {}, "cpu", {}, {}) is None
    assert not study.exists()  # no seed complete: nothing to show
    result = write_ablation_result(study, records, conditions, seeds, {}, {}, "cpu", {}, {})
    assert result["seeds"] == [1986]
    assert result["partial"] == {"planned_seeds": seeds, "finished_runs": 3, "planned_runs": 4}
    assert result["conditions"]["hierarchy"]["delta_wer_mean"] == -10.0
    assert json.loads((study / "ablation.json").read_text()) == json.loads(json.dumps(result))
    store_results(study, tmp_path / "results" / "study", commit="0123abc",
                  command="sbkd demo --study")
    print_tables([str(tmp_path / "results")])
    printed = capsys.readouterr().out
    assert "**Partial:** 3 of 4 runs finished" in printed and "(1 of 2)" in printed
    records[("hierarchy", 1987)] = run(32.0, 1987)
    result = write_ablation_result(study, records, conditions, seeds, {}, {}, "cpu", {}, {})
    assert result["seeds"] == seeds and "partial" not in result


def test_noise_alone_makes_a_flat_curve_look_unconverged_by_the_gain_but_not_by_the_trend():
    # 80 epochs around 50 % valid WER with 1 point of noise and no trend at all: the gain (a
    # best epoch against one epoch) passes the 3 % threshold, the trend stays near 0.
    import numpy as np

    from sb_crossmodal_kd.ablation import FLAT_GAIN, last_quarter_gain, last_quarter_trend

    curve = list(50.0 + np.random.default_rng(3).normal(0.0, 1.0, 80))
    assert last_quarter_gain(curve) >= FLAT_GAIN
    assert abs(last_quarter_trend(curve)) < 0.01
    falling = [50.0 - 0.1 * epoch for epoch in range(80)]  # still learning: both see it
    assert last_quarter_trend(falling) > 0.01 and last_quarter_gain(falling) > 0.03
