"""The wheel carries everything the library runs: installed outside the clone (no recipes, no
repository files), `sbkd demo --help` and a tiny ablation run from an empty folder."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from test_ablation import TINY_MODEL, TINY_PREP

from sb_crossmodal_kd.ablation import DEMO_TRAINING

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The package built as a wheel and installed into a folder of its own."""
    base = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(base / "dist"), str(ROOT)], check=True, capture_output=True)
    wheel = next((base / "dist").glob("sb_crossmodal_kd-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(base / "site"), str(wheel)], check=True, capture_output=True)
    return wheel, base / "site"


def _run(site, folder, *args):
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=900)


def test_wheel_holds_the_hparams_and_lexicon_and_no_recipe(installed):
    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert not any(name.startswith("recipes/") for name in names)
    for needed in ("sb_crossmodal_kd/hparams/kd/hierarchy.yaml",
                   "sb_crossmodal_kd/hparams/kd/base.yaml", "sb_crossmodal_kd/hparams/moe.yaml",
                   "sb_crossmodal_kd/hparams/lm/senone.yaml",
                   "sb_crossmodal_kd/units/data/cmudict.dict.gz",
                   "sb_crossmodal_kd/units/data/CMUDICT_LICENSE"):
        assert needed in names, needed


def test_installed_wheel_runs_the_demo_help_and_an_ablation_from_an_empty_folder(installed,
                                                                                  tmp_path):
    _, site = installed
    where = _run(site, tmp_path, "-c", "import sb_crossmodal_kd; print(sb_crossmodal_kd.__file__)")
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr
    shown = _run(site, tmp_path, "-m", "sb_crossmodal_kd.cli", "demo", "--help")
    assert shown.returncode == 0 and "--study" in shown.stdout, shown.stderr[-2000:]
    # The CLI starts from DEMO_TRAINING; these overrides make it tiny
    training = {k: v for k, v in TINY_MODEL.items() if DEMO_TRAINING.get(k) != v}
    run = _run(site, tmp_path, "-m", "sb_crossmodal_kd.cli", "ablation", "--output", "abl",
               "--conditions", "am_alone", "hierarchy", "--prep", json.dumps(TINY_PREP),
               "--training", json.dumps(training))
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert set(result["conditions"]) == {"am_alone", "hierarchy"}
    assert result["ran"]["command"].startswith("sbkd ablation --output abl --conditions")
    assert all(0 <= c["wer"][0] <= 100 for c in result["conditions"].values())
    assert os.listdir(tmp_path) == ["abl"]  # nothing written outside the output folder
    assert (tmp_path / "abl" / "prep" / "lm" / "senone" / "lm" / "hyperparams.yaml").is_file()
