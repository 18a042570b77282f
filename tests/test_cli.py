"""The sbkd console script: every subcommand is registered and `sbkd corpus` works."""

import csv
import signal
import subprocess
import sys
import time

from sb_crossmodal_kd.cli import SUBCOMMANDS, build_parser


def test_every_subcommand_has_help():
    help_text = build_parser().format_help()
    for name in SUBCOMMANDS:
        assert name in help_text


def test_version_is_the_installed_distributions():
    from importlib.metadata import version

    done = subprocess.run([sys.executable, "-m", "sb_crossmodal_kd.cli", "--version"],
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == f"sbkd {version('sb-crossmodal-kd')}"


def test_corpus_command_writes_manifests(tmp_path):
    cmd = [
        sys.executable, "-m", "sb_crossmodal_kd.cli", "corpus", "--output", str(tmp_path / "c"),
        "--n_train", "3", "--n_valid", "1", "--n_test", "1", "--n_text", "20",
        "--n_text_valid", "5", "--speakers", "1", "1", "1",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "train:" in run.stdout
    with open(tmp_path / "c" / "train.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 and list(rows[0]) == ["ID", "duration", "wav", "spk_id", "wrd"]


def test_ctrl_c_ends_a_command_with_one_line(tmp_path):
    cmd = [sys.executable, "-m", "sb_crossmodal_kd.cli", "corpus", "--output",
           str(tmp_path / "c"), "--n_train", "5000", "--jobs", "2"]
    # SIGINT as a terminal gives it: a test process may run with it ignored (inherited from
    # a background launch), and an ignored SIGINT stays ignored across exec.
    command = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not list((tmp_path / "c").rglob("*.wav")) and time.time() < deadline:
        time.sleep(0.1)  # synthesising: well inside the work
    command.send_signal(signal.SIGINT)
    _, stderr = command.communicate(timeout=120)  # the corpus alone would take minutes
    assert command.returncode == 130
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == "sbkd corpus: interrupted"
