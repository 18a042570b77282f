"""recipes/TIMIT/KD on a tiny TIMIT tree made from eSpeak speech (NIST SPHERE audio, .PHN and
.WRD from the synthesiser's timings): timit_kd_prepare.py runs the whole KD data chain, then
one epoch of the full hierarchy trains and tests."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile
from tiny_kd import TINY_KD_MODEL, tiny_chain

from sb_crossmodal_kd.data.corpus import make_corpus

RECIPE = Path(__file__).resolve().parents[1] / "recipes/TIMIT/KD"
RATE = 16000
# Synthetic speakers become: train speakers, the first dev speaker, the first core-test one.
TIMIT_SPEAKERS = {"train": ("TRAIN", "DR1", ("FCJF0", "MKLW0")),
                  "valid": ("TEST", "DR3", ("FAKS0",)), "test": ("TEST", "DR1", ("MDAB0",))}


def timit_segments(timed, n_samples):
    """Seconds -> non-overlapping sample segments covering the audio, as TIMIT's do; silence
    as TIMIT writes it."""
    segments, previous = [], 0
    if timed and timed[0][1] > 0:
        timed = [("sil", 0.0, timed[0][1])] + list(timed)
    if timed and timed[-1][2] * RATE < n_samples:
        timed = list(timed) + [("sil", timed[-1][2], n_samples / RATE)]
    for i, (label, start, end) in enumerate(timed):
        start, end = max(previous, round(start * RATE)), min(n_samples, round(end * RATE))
        if end <= start:
            continue
        if label == "sil":
            label = "h#" if i in (0, len(timed) - 1) else "pau"
        segments.append((label.lower(), start, end))
        previous = end
    return segments


def write_timit_tree(paths, root):
    """The eSpeak corpus as TIMIT/TRAIN|TEST/DRn/<speaker>/SI<n>.WAV|.PHN|.WRD."""
    for split, (part, region, speakers) in TIMIT_SPEAKERS.items():
        alignments = json.loads(paths[split].with_name(f"{split}_alignments.json").read_text())
        with open(paths[split], newline="") as handle:
            rows = list(csv.DictReader(handle))
        for i, row in enumerate(rows):
            folder = root / part / region / speakers[i % len(speakers)]
            folder.mkdir(parents=True, exist_ok=True)
            stem = folder / f"SI{1000 + i}"
            audio, rate = soundfile.read(row["wav"])
            soundfile.write(f"{stem}.WAV", audio, rate, format="NIST", subtype="PCM_16")
            entry = alignments[row["ID"]]
            phones = timit_segments(entry["phones"], len(audio))
            words = []
            for text, s, e in entry["words"]:
                # eSpeak sometimes times a few words as one event: share its span out.
                parts = text.split()
                step = (e - s) / len(parts)
                words += [(w, round((s + k * step) * RATE),
                           min(len(audio), round((s + (k + 1) * step) * RATE)))
                          for k, w in enumerate(parts)]
            Path(f"{stem}.PHN").write_text("".join(f"{s} {e} {p}\n" for p, s, e in phones))
            Path(f"{stem}.WRD").write_text("".join(f"{s} {e} {w}\n" for w, s, e in words))


def run(args, cwd):
    """Runs a recipe script; a failure shows the end of its output."""
    done = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


@pytest.fixture(scope="module")
def timit(tmp_path_factory):
    synth = tmp_path_factory.mktemp("synth").resolve()
    paths = make_corpus(synth, progress=False, n_train=12, n_valid=3, n_test=3, n_text=100,
                        n_text_valid=10, speakers=(2, 1, 1), seed=5)
    root = tmp_path_factory.mktemp("timit").resolve() / "TIMIT"
    write_timit_tree(paths, root)
    return root, paths["lm_train"]


@pytest.mark.slow  # the three unit LMs train in subprocesses: about 2 minutes on 2 busy cores
def test_kd_prepare_and_one_epoch_of_the_hierarchy(timit, tmp_path):
    root, lm_text = timit
    (tmp_path / "prep.yaml").write_text(tiny_chain(aligner_utterances=12))
    out = tmp_path / "out"
    run([RECIPE / "timit_kd_prepare.py", f"--data_folder={root}", f"--output={out}",
         f"--lm_text={lm_text}", f"--settings={tmp_path / 'prep.yaml'}"], tmp_path)
    prep = json.loads((out / "prep" / "prep.json").read_text())
    assert prep["manifests"]["test"] == str(out / "manifests" / "test.csv")
    assert prep["settings"]["vocab_size"] == 32 and prep["outputs"]["n_senones"] > 1
    assert (out / "manifests" / "train_phone_alignments.json").is_file()

    folder = tmp_path / "run"
    run([RECIPE / "train.py", RECIPE / "hparams" / "kd.yaml", "--condition=hierarchy",
         f"--prep_folder={out / 'prep'}", f"--output_folder={folder}", *TINY_KD_MODEL], tmp_path)
    results = json.loads((folder / "results.json").read_text())
    assert results["utterances"] == 3 and results["epochs"] == 1
    log = (folder / "train_log.txt").read_text()
    for term in ("main", "kd_senone", "kd_monophone", "kd_subword"):
        assert f"train loss_{term}:" in log
