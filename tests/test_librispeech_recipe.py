"""recipes/LibriSpeech on a tiny tree in the official layout (generated speech written as flac):
the manifests, the errors for a folder with missing parts, and prepare + KD chain + one epoch
of the full hierarchy."""

import csv
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile
from tiny_kd import TINY_KD_MODEL, tiny_chain

from sb_crossmodal_kd.data.corpus import make_corpus
from sb_crossmodal_kd.data.manifest import check_manifest

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "LibriSpeech"
SPLITS = {"train": "train-clean-100", "valid": "dev-clean", "test": "test-clean"}


def load_prepare():
    spec = importlib.util.spec_from_file_location("librispeech_prepare",
                                                  RECIPE / "librispeech_prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_librispeech_tree(paths, root):
    """The corpus's splits as LibriSpeech/<split>/<speaker>/<chapter>/ with flac audio and
    upper-case ``<speaker>-<chapter>.trans.txt``, two chapters per speaker."""
    speakers = {}
    for split, name in SPLITS.items():
        with open(paths[split], newline="") as handle:
            rows = list(csv.DictReader(handle))
        chapters = {}
        for i, row in enumerate(rows):
            speaker = speakers.setdefault(row["spk_id"], str(100 + len(speakers)))
            chapter = f"{10 + i % 2}"
            folder = root / name / speaker / chapter
            folder.mkdir(parents=True, exist_ok=True)
            utt = f"{speaker}-{chapter}-{i:04d}"
            audio, rate = soundfile.read(row["wav"])
            soundfile.write(str(folder / f"{utt}.flac"), audio, rate, format="FLAC")
            chapters.setdefault(folder, []).append(f"{utt} {row['wrd'].upper()}")
        for folder, lines in chapters.items():
            trans = folder / f"{folder.parent.name}-{folder.name}.trans.txt"
            trans.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def librispeech(tmp_path_factory):
    synth = tmp_path_factory.mktemp("synth").resolve()
    paths = make_corpus(synth, progress=False, n_train=20, n_valid=4, n_test=4, n_text=100,
                        n_text_valid=10, speakers=(3, 1, 1), seed=7)
    data = tmp_path_factory.mktemp("librispeech").resolve()
    write_librispeech_tree(paths, data / "LibriSpeech")
    lm_text = data / "librispeech-lm-norm.txt"
    lm_text.write_text(paths["lm_train"].read_text().upper())
    return data, lm_text


def test_manifests_from_the_official_layout(librispeech, tmp_path):
    data, _ = librispeech
    prepare = load_prepare()
    manifests = prepare.prepare_librispeech(data, tmp_path / "m", train_set="100")
    rows = {split: check_manifest(path, sample_rate=16000)
            for split, path in manifests.items()}
    assert [len(rows[s]) for s in ("train", "valid", "test")] == [20, 4, 4]
    first = rows["train"][0]
    speaker, chapter, _ = first["ID"].split("-")
    assert first["spk_id"] == speaker and first["wrd"] == first["wrd"].upper()
    flac = Path(first["wav"])
    assert flac.parent == data / "LibriSpeech" / "train-clean-100" / speaker / chapter
    assert float(first["duration"]) == pytest.approx(soundfile.info(str(flac)).duration, 1e-3)
    trans = (flac.parent / f"{speaker}-{chapter}.trans.txt").read_text()
    assert f"{first['ID']} {first['wrd']}\n" in trans
    # Same options again: kept; other options in the same folder: refused.
    assert prepare.prepare_librispeech(data, tmp_path / "m", train_set="100") == manifests
    with pytest.raises(FileExistsError, match="differs in: test_split"):
        prepare.prepare_librispeech(data, tmp_path / "m", test_split="test-other")


def test_missing_parts_are_named(librispeech, tmp_path):
    data, _ = librispeech
    prepare = load_prepare()
    with pytest.raises(prepare.LibriSpeechError,
                       match=r"train-clean-360: split train-clean-360 not found \(found: "
                             r"dev-clean, test-clean, train-clean-100\)"):
        prepare.prepare_librispeech(data, tmp_path / "m460", train_set="460")
    broken = tmp_path / "LibriSpeech"
    shutil.copytree(data / "LibriSpeech" / "dev-clean", broken / "dev-clean")
    trans = sorted(broken.glob("dev-clean/*/*/*.trans.txt"))[0]
    speaker, chapter = trans.parent.parent.name, trans.parent.name
    with open(trans, "a") as handle:
        handle.write(f"{speaker}-{chapter}-9999 A LOST LINE\n")
    with pytest.raises(prepare.LibriSpeechError,
                       match=rf"trans\.txt, line \d+: the audio of utterance "
                             rf"{speaker}-{chapter}-9999 is missing"):
        prepare.split_rows(broken, "dev-clean")
    (trans.parent / f"{speaker}-{chapter}-9999.flac").write_bytes(b"fLaC but not really")
    with pytest.raises(prepare.LibriSpeechError,
                       match=rf"9999\.flac: cannot read the audio of {speaker}-{chapter}-9999"):
        prepare.split_rows(broken, "dev-clean")


def test_prepare_chain_and_one_epoch_of_the_hierarchy(librispeech, tmp_path):
    data, lm_text = librispeech
    (tmp_path / "prep.yaml").write_text(tiny_chain())
    out = tmp_path / "out"
    subprocess.run(
        [sys.executable, str(RECIPE / "librispeech_prepare.py"), f"--data_folder={data}",
         f"--output={out}", "--train_set=100", f"--lm_text={lm_text}",
         f"--settings={tmp_path / 'prep.yaml'}"],
        check=True, cwd=tmp_path, capture_output=True, text=True)
    prep = json.loads((out / "prep" / "prep.json").read_text())
    assert prep["lm_text"] == str(lm_text) and prep["settings"]["vocab_size"] == 32
    assert prep["outputs"]["n_senones"] > 1
    lm_lines = (out / "prep" / "lm_text" / "train.txt").read_text().splitlines()
    assert len(lm_lines) == 60 and all(line == line.upper() for line in lm_lines)

    run = tmp_path / "run"
    subprocess.run(
        [sys.executable, str(RECIPE / "train.py"), str(RECIPE / "hparams" / "kd.yaml"),
         "--condition=hierarchy", f"--prep_folder={out / 'prep'}", f"--output_folder={run}",
         *TINY_KD_MODEL],
        check=True, cwd=tmp_path, capture_output=True, text=True)
    results = json.loads((run / "results.json").read_text())
    assert results["utterances"] == 4 and results["epochs"] == 1
    log = (run / "train_log.txt").read_text()
    for term in ("main", "kd_senone", "kd_monophone", "kd_subword"):
        assert f"train loss_{term}:" in log
    assert results["params_with_heads"] > results["params"]
