"""The baseline recipe trains on a tiny generated corpus and writes its results file."""

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sb_crossmodal_kd.data.corpus import make_corpus

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "SynthCommands" / "ASR"
TINY_MODEL = [
    "--d_model=32", "--num_layers=1", "--nhead=2", "--d_ffn=64", "--n_mels=40",
    "--vocab_size=40", "--max_batch_seconds=25", "--warmup_steps=5", "--lr=0.003",
]


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth")
    make_corpus(folder, progress=False, n_train=24, n_valid=6, n_test=6, n_text=100,
                n_text_valid=10, speakers=(3, 1, 1), seed=3)
    return folder


def test_recipe_trains_with_falling_loss_and_writes_results(tiny_corpus, tmp_path):
    out = tmp_path / "exp"
    cmd = [
        sys.executable, str(RECIPE / "train.py"), str(RECIPE / "hparams" / "conformer_ctc.yaml"),
        f"--data_folder={tiny_corpus}", f"--output_folder={out}", "--number_of_epochs=3",
        *TINY_MODEL,
    ]
    subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True, text=True)
    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"wer", "cer", "utterances", "params", "epochs"}
    assert results["utterances"] == 6 and results["epochs"] == 3
    log = (out / "train_log.txt").read_text().splitlines()
    losses = [float(line.split("train loss: ")[1].split(",")[0]) for line in log if "train loss" in line]
    assert len(losses) == 3 and losses[-1] < losses[0]
    # SpeechBrain's environment description, the package list included
    env = (out / "env.log").read_text().splitlines()
    assert env[0] == "SpeechBrain system description"
    assert f"speechbrain=={importlib.metadata.version('speechbrain')}" in env


def test_bad_manifest_stops_before_training(tiny_corpus, tmp_path):
    bad = tmp_path / "train.csv"
    bad.write_text((tiny_corpus / "train.csv").read_text().replace(",wrd", ",words"))
    cmd = [
        sys.executable, str(RECIPE / "train.py"), str(RECIPE / "hparams" / "conformer_ctc.yaml"),
        f"--data_folder={tiny_corpus}", f"--train_csv={bad}", f"--output_folder={tmp_path/'x'}",
        *TINY_MODEL,
    ]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode != 0
    output = run.stdout + run.stderr
    assert "missing column(s) wrd" in output and str(bad) in output
