"""TIMIT: the 61 -> 39 folding, timit_prepare.py on a tiny tree in the official layout (NIST
SPHERE audio, hand-made .PHN/.WRD segmentations), its refusals, and one epoch of the frame
recipe on it."""

import csv
import doctest
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile

from sb_crossmodal_kd.alignment.corpus import load_alignments
from sb_crossmodal_kd.units.phones import PHONES
from sb_crossmodal_kd.units.timit import (
    TIMIT_39_TO_PACKAGE,
    TIMIT_61_TO_39,
    TIMIT_PHONES_39,
    TIMIT_TO_PACKAGE,
    TIMIT_TO_PACKAGE_39,
    fold_61_to_39,
    to_package_phones,
)

RECIPE = Path(__file__).resolve().parents[1] / "recipes/TIMIT"
RATE = 16000

# Made-up words spelled in TIMIT labels; together they use closures, q, flaps, pauses.
WORDS = {
    "she": ["sh", "iy"], "had": ["hv", "ae", "dcl", "d"], "your": ["y", "axr"],
    "dark": ["dcl", "d", "aa", "r", "kcl", "k"], "suit": ["s", "ux", "tcl", "t"],
    "water": ["w", "ao", "dx", "axr"], "ask": ["q", "ae", "s", "kcl", "k"],
    "me": ["m", "iy"], "to": ["tcl", "t", "ix"], "measure": ["m", "eh", "zh", "er"],
}
# Where the tiny tree's speakers go: 2 train, 1 core test, 1 dev, 1 TEST speaker in neither.
SPEAKERS = {("TRAIN", "DR1", "FCJF0"), ("TRAIN", "DR2", "MKLW0"), ("TEST", "DR1", "MDAB0"),
            ("TEST", "DR3", "FAKS0"), ("TEST", "DR1", "MXYZ0")}
SENTENCES = ("SA1", "SX14", "SI648")


def load_module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def prepare():
    return load_module("timit_prepare", RECIPE / "timit_prepare.py")


def make_utterance(rng):
    """``(audio, phones, words)``: segments in samples, a tone per phone plus noise."""
    words = list(rng.choice(list(WORDS), size=rng.integers(3, 5), replace=False))
    phones, timed_words, t = [], [], 0
    frequencies = {p: 200.0 + 60.0 * i for i, p in enumerate(TIMIT_61_TO_39)}

    def add(label, length):
        nonlocal t
        phones.append((label, t, t + length))
        t += length

    add("h#", int(rng.integers(1600, 3200)))
    for i, word in enumerate(words):
        if i and rng.random() < 0.5:
            add("pau", int(rng.integers(800, 1600)))
        start = t
        for label in WORDS[word]:
            add(label, int(rng.integers(480, 1920)))
        timed_words.append((word, start, t))
    add("h#", int(rng.integers(1600, 3200)))
    audio = 0.01 * rng.standard_normal(t)
    for label, start, end in phones:
        time = np.arange(end - start) / RATE
        audio[start:end] += 0.3 * np.sin(2 * np.pi * frequencies[label] * time)
    return audio, phones, timed_words


def make_timit_tree(root, lower=False, seed=0):
    """A TIMIT tree in the official layout; returns ``{utterance ID: (n_samples, phones)}``."""
    rng = np.random.default_rng(seed)
    case = str.lower if lower else str.upper
    truth = {}
    for split, region, speaker in sorted(SPEAKERS):
        folder = root / case(split) / case(region) / case(speaker)
        folder.mkdir(parents=True)
        for sentence in SENTENCES:
            audio, phones, words = make_utterance(rng)
            stem = folder / case(sentence)
            soundfile.write(f"{stem}.{case('wav')}", audio, RATE, format="NIST",
                            subtype="PCM_16")
            Path(f"{stem}.{case('phn')}").write_text(
                "".join(f"{s} {e} {p}\n" for p, s, e in phones))
            Path(f"{stem}.{case('wrd')}").write_text(
                "".join(f"{s} {e} {w}\n" for w, s, e in words))
            Path(f"{stem}.{case('txt')}").write_text(
                f"0 {len(audio)} {' '.join(w for w, _, _ in words).capitalize()}.\n")
            truth[f"{speaker}_{sentence}"] = (len(audio), phones, words)
    return truth


@pytest.fixture(scope="module")
def timit(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus") / "TIMIT"
    return root, make_timit_tree(root)


@pytest.fixture(scope="module")
def prepared(timit, prepare, tmp_path_factory):
    root, truth = timit
    out = tmp_path_factory.mktemp("prepared")
    prepare.prepare_timit(root, out)
    return out, truth


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# The 61 -> 39 folding ----------------------------------------------------------------------

def test_folding_is_lee_and_hon():
    assert len(TIMIT_61_TO_39) == 61
    assert TIMIT_PHONES_39 == tuple(sorted(
        "iy ih eh ae ah uw uh aa ey ay oy aw ow l r y w er m n ng ch jh dh b d dx g p t k z v f "
        "th s sh hh sil".split()))
    folds = {"ao": "aa", "ax": "ah", "ax-h": "ah", "axr": "er", "el": "l", "em": "m",
             "en": "n", "nx": "n", "eng": "ng", "hv": "hh", "ix": "ih", "ux": "uw", "zh": "sh"}
    silences = {"pcl", "tcl", "kcl", "bcl", "dcl", "gcl", "h#", "pau", "epi"}
    for phone, folded in TIMIT_61_TO_39.items():
        expected = folds.get(phone, "sil" if phone in silences else phone)
        assert folded == (None if phone == "q" else expected), phone
    assert fold_61_to_39(["q", "ax-h", "Q"]) == ["ah"]
    with pytest.raises(ValueError, match="'xx' is not one of TIMIT's 61"):
        fold_61_to_39(["xx"])


def test_mapping_to_the_package_inventory():
    assert set(TIMIT_39_TO_PACKAGE.values()) <= set(PHONES)
    # AO and ZH are folded away by the 39-set; the flap becomes T.
    assert set(PHONES) - set(TIMIT_39_TO_PACKAGE.values()) == {"AO", "ZH"}
    assert TIMIT_39_TO_PACKAGE["dx"] == "T"
    assert TIMIT_39_TO_PACKAGE["sil"] == "sil"
    assert [p for p in TIMIT_39_TO_PACKAGE
            if TIMIT_39_TO_PACKAGE[p] != p.upper() and p != "sil"] == ["dx"]
    assert set(TIMIT_TO_PACKAGE.values()) - {None} == set(PHONES)
    assert {p for p in TIMIT_TO_PACKAGE if TIMIT_TO_PACKAGE[p] != TIMIT_TO_PACKAGE_39[p]} == {
        "ao", "zh"}
    assert to_package_phones(["ao", "zh", "q", "tcl"], "timit39") == ["AA", "SH", "sil"]
    with pytest.raises(ValueError, match="phone_set must be one of"):
        to_package_phones(["aa"], "ipa")


# Preparation ---------------------------------------------------------------------------------

def test_splits_follow_the_standard_speaker_lists(prepared, prepare):
    out, truth = prepared
    assert len(prepare.CORE_TEST_SPEAKERS) == len(set(prepare.CORE_TEST_SPEAKERS)) == 24
    assert len(prepare.DEV_SPEAKERS) == len(set(prepare.DEV_SPEAKERS)) == 50
    assert not set(prepare.DEV_SPEAKERS) & set(prepare.CORE_TEST_SPEAKERS)
    speakers = {split: {row["spk_id"] for row in read_csv(out / f"{split}.csv")}
                for split in ("train", "valid", "test")}
    assert speakers == {"train": {"FCJF0", "MKLW0"}, "valid": {"FAKS0"}, "test": {"MDAB0"}}
    ids = [row["ID"] for split in ("train", "valid", "test")
           for row in read_csv(out / f"{split}.csv")]
    assert not any(utt.endswith("_SA1") for utt in ids)  # SA sentences left out
    assert len(ids) == 4 * 2


def test_manifest_rows_match_the_files(prepared):
    out, truth = prepared
    for row in read_csv(out / "train.csv"):
        n_samples, phones, words = truth[row["ID"]]
        assert list(row) == ["ID", "duration", "wav", "spk_id", "wrd", "phn61", "phn"]
        assert soundfile.info(row["wav"]).format == "NIST"
        assert float(row["duration"]) == pytest.approx(n_samples / RATE, abs=1e-4)
        assert row["wrd"] == " ".join(w for w, _, _ in words)
        assert row["phn61"].split() == [p for p, _, _ in phones]
        assert row["phn"].split() == fold_61_to_39(p for p, _, _ in phones)
        assert "q" not in row["phn"].split()


def test_alignments_are_the_hand_segmentation_in_seconds(prepared):
    out, truth = prepared
    frame_files = {name: json.loads((out / f"valid{suffix}").read_text())
                   for name, suffix in (("timit39", "_alignments.json"),
                                        ("cmudict", "_alignments_cmudict.json"))}
    header, records = load_alignments(out / "valid_phone_alignments.json")
    assert header["source"] == "TIMIT hand segmentation"
    for utt, entry in frame_files["timit39"].items():
        n_samples, phones, words = truth[utt]
        kept = [(p, s, e) for p, s, e in phones if p != "q"]
        assert entry["phones"] == [[TIMIT_TO_PACKAGE_39[p], s / RATE, e / RATE]
                                   for p, s, e in kept]
        assert [p for p, _, _ in frame_files["cmudict"][utt]["phones"]] == [
            TIMIT_TO_PACKAGE[p] for p, _, _ in kept]
        assert entry["words"] == [[w, s / RATE, e / RATE] for w, s, e in words]
        # The unit-store alignment: phones without silence, a position per 10 ms frame.
        record = records[utt]
        speech = [(TIMIT_TO_PACKAGE[p], s, e) for p, s, e in kept if TIMIT_TO_PACKAGE[p] != "sil"]
        assert record["phones"] == [p for p, _, _ in speech]
        positions = record["feature_positions"]
        assert len(positions) == 1 + n_samples // 160
        for k, (_, s, e) in enumerate(speech):
            assert positions[(s + e) // 2 // 160] == k
        assert positions[0] == -1 and positions[-1] == -1  # h# at both ends


def test_frame_recipe_labels_10ms_frames_from_the_phn_samples(prepared):
    out, truth = prepared
    train = load_module("timit_frame_train", RECIPE / "frame_classification/train.py")
    frame = train.load_frame_recipe()
    hparams = {"sample_rate": RATE, "alignment_tolerance": 2, "alignments_folder": None,
               "alignments_suffix": "_alignments.json",
               **{f"{s}_csv": str(out / f"{s}.csv") for s in ("train", "valid", "test")}}
    datasets = frame.dataio_prepare(hparams)
    checked = 0
    for item in datasets["test"]:
        n_samples, phones, _ = truth[item["id"]]
        labels = item["frame_labels"]
        assert len(labels) == 1 + n_samples // 160
        for phone, start, end in phones:
            # Frame t is centred on sample 160 t: it belongs to the segment holding that sample.
            for t in range(-(-start // 160), -(-end // 160)):
                expected = TIMIT_TO_PACKAGE_39[phone]
                assert labels[t] == (-1 if expected is None else PHONES.index(expected))
                checked += 1
    # Every frame whose centre lies inside the audio was checked.
    assert checked == sum((n - 1) // 160 + 1 for utt, (n, _, _) in truth.items()
                          if utt.startswith("MDAB0") and not utt.endswith("SA1"))


def test_lower_case_layout_gives_the_same_manifests(prepared, prepare, tmp_path):
    out, _ = prepared
    make_timit_tree(tmp_path / "timit", lower=True)
    prepare.prepare_timit(tmp_path / "timit", tmp_path / "out")
    for split in ("train", "valid", "test"):
        upper = read_csv(out / f"{split}.csv")
        lower = read_csv(tmp_path / "out" / f"{split}.csv")
        drop = ("wav",)
        assert [{k: v for k, v in r.items() if k not in drop} for r in lower] == [
            {k: v for k, v in r.items() if k not in drop} for r in upper]


def test_include_sa_and_rerun_refusal(timit, prepare, tmp_path):
    root, _ = timit
    prepare.prepare_timit(root, tmp_path, include_sa=True)
    ids = [row["ID"] for row in read_csv(tmp_path / "train.csv")]
    assert "FCJF0_SA1" in ids and len(ids) == 6
    before = (tmp_path / "train.csv").stat().st_mtime_ns
    prepare.prepare_timit(root, tmp_path, include_sa=True)  # complete: skipped
    assert (tmp_path / "train.csv").stat().st_mtime_ns == before
    with pytest.raises(prepare.TimitError, match="other settings.*include_sa"):
        prepare.prepare_timit(root, tmp_path)


# Refusals --------------------------------------------------------------------------------------

def test_missing_test_folder_is_named(prepare, tmp_path):
    (tmp_path / "TIMIT" / "TRAIN" / "DR1").mkdir(parents=True)
    with pytest.raises(prepare.TimitError, match="TEST missing .found: TRAIN."):
        prepare.prepare_timit(tmp_path / "TIMIT", tmp_path / "out")


def test_wav_without_phn_is_named(prepare, tmp_path):
    make_timit_tree(tmp_path / "TIMIT", seed=1)
    phn = tmp_path / "TIMIT/TRAIN/DR2/MKLW0/SX14.PHN"
    phn.unlink()
    with pytest.raises(prepare.TimitError, match=r"MKLW0/SX14.WAV has no .PHN file.*SX14.PHN"):
        prepare.prepare_timit(tmp_path / "TIMIT", tmp_path / "out")
    assert not (tmp_path / "out" / "train.csv").exists()


def test_phn_not_matching_the_audio_length_is_refused_beyond_the_tolerance(prepare, tmp_path):
    truth = make_timit_tree(tmp_path / "TIMIT", seed=2)
    phn = tmp_path / "TIMIT/TEST/DR1/MDAB0/SI648.PHN"
    n_samples = truth["MDAB0_SI648"][0]
    lines = phn.read_text().splitlines()
    start = lines[-1].split()[0]
    phn.write_text("\n".join(lines[:-1] + [f"{start} {n_samples + 100} h#"]) + "\n")
    prepare.prepare_timit(tmp_path / "TIMIT", tmp_path / "ok")  # 100 samples: clipped
    rows = {row["ID"]: row for row in read_csv(tmp_path / "ok" / "test.csv")}
    assert "MDAB0_SI648" in rows
    phones = json.loads((tmp_path / "ok" / "test_alignments.json").read_text())["MDAB0_SI648"]
    assert phones["phones"][-1][2] == n_samples / RATE
    phn.write_text("\n".join(lines[:-1] + [f"{start} {n_samples + 800} h#"]) + "\n")
    with pytest.raises(prepare.TimitError, match=rf"SI648.PHN: the last segment ends at sample "
                                                 rf"{n_samples + 800} but the audio has "
                                                 rf"{n_samples} samples .tolerance 160"):
        prepare.prepare_timit(tmp_path / "TIMIT", tmp_path / "bad")
    phn.write_text("\n".join(lines[:-1]) + "\n")  # the final h# lost: the end unlabelled
    with pytest.raises(prepare.TimitError, match=rf"SI648.PHN: the phones end at sample {start} "
                                                 rf"but the audio has {n_samples} samples"):
        prepare.prepare_timit(tmp_path / "TIMIT", tmp_path / "short")


def test_malformed_phn_lines_are_named(prepare, tmp_path):
    make_timit_tree(tmp_path / "TIMIT", seed=3)
    phn = tmp_path / "TIMIT/TRAIN/DR1/FCJF0/SI648.PHN"
    lines = phn.read_text().splitlines()
    phn.write_text("\n".join([lines[0], "12 x sh"] + lines[2:]) + "\n")
    with pytest.raises(prepare.TimitError, match="SI648.PHN, line 2: expected"):
        prepare.prepare_timit(tmp_path / "TIMIT", tmp_path / "out")
    phn.write_text("\n".join([lines[0], lines[1].replace(lines[1].split()[2], "zz")]) + "\n")
    with pytest.raises(ValueError, match="SI648.PHN, line 2: 'zz' is not one of TIMIT's 61"):
        prepare.prepare_timit(tmp_path / "TIMIT", tmp_path / "out")


def test_prepare_doctests(prepare, tmp_path):
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(prepare, optionflags=flags,
                             extraglobs={"getfixture": lambda name: tmp_path})
    assert result.attempted >= 4 and result.failed == 0


# The frame recipe on TIMIT ---------------------------------------------------------------------

def test_one_epoch_of_the_deep_moe_frame_recipe(prepared, tmp_path):
    out, _ = prepared
    train = load_module("timit_frame_train", RECIPE / "frame_classification/train.py")
    results = train.load_frame_recipe().run(
        RECIPE / "frame_classification/hparams/dmoe.yaml",
        {"data_folder": str(out), "output_folder": str(tmp_path / "dmoe"),
         "number_of_epochs": 1, "batch_size": 2},
    )
    saved = json.loads((tmp_path / "dmoe" / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["num_combinations"] == 16 and 1 <= saved["combinations_used"] <= 16
    assert saved["labelled_frames"] > 100
    assert 0.0 <= saved["frame_accuracy"] <= 1.0
    assert (tmp_path / "dmoe" / "train_log.txt").read_text().count("frame_acc") >= 1


def test_timit_hparams_are_the_synthcommands_models(tmp_path):
    from sb_crossmodal_kd.experiment import load_hparams

    synth = Path(__file__).resolve().parents[1] / "recipes/SynthCommands/frame_classification"
    overrides = {"data_folder": str(tmp_path), "output_folder": str(tmp_path / "out")}
    for name in ("dmoe", "dense_mlp", "moe_single"):
        timit = load_hparams(RECIPE / f"frame_classification/hparams/{name}.yaml", overrides)
        base = load_hparams(synth / f"hparams/{name}.yaml", overrides)
        assert timit["train_csv"] == f"{tmp_path}/train.csv"
        assert timit["alignments_suffix"] == "_alignments.json"
        assert timit["alignments_folder"] is None  # the data folder itself
        assert str(timit["model"]) == str(base["model"])
        assert sum(p.numel() for p in timit["model"].parameters()) == sum(
            p.numel() for p in base["model"].parameters())
