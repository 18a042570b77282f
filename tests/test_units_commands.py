"""`sbkd align`, `build-tree` and `export-units` chained on a tiny manifest; `sbkd align` with
`--jobs` and under torchrun."""

import csv
import json
import os
import subprocess

import numpy as np
import soundfile
from launch import torchrun_command

from sb_crossmodal_kd.alignment.framerate import FrameRate
from sb_crossmodal_kd.cli import main
from sb_crossmodal_kd.units.lexicon import Lexicon
from sb_crossmodal_kd.units.senones import SenoneTree
from sb_crossmodal_kd.units.store import UnitStore

WORDS = ["sam", "me", "miss", "sea", "ma"]


def _manifest(folder, name, n, rng):
    rows = []
    for i in range(n):
        words = [WORDS[j] for j in rng.integers(0, len(WORDS), 3)]
        # Tones with pauses: a stand-in for speech, enough to exercise every step.
        pieces = [0.01 * rng.standard_normal(2000)]
        for _ in range(9):
            f = rng.choice([300.0, 900.0, 1500.0, 2500.0])
            pieces.append(0.5 * np.sin(2 * np.pi * f * np.arange(1600) / 16000))
        pieces.append(0.01 * rng.standard_normal(2000))
        wav = folder / f"{name}{i}.wav"
        soundfile.write(wav, np.concatenate(pieces), 16000)
        rows.append({"ID": f"{name}{i}", "duration": 1.15, "wav": str(wav), "spk_id": "s",
                     "wrd": " ".join(words)})
    path = folder / f"{name}.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_align_build_tree_export_units_chain(tmp_path, capsys):
    rng = np.random.default_rng(0)
    train = _manifest(tmp_path, "train", 12, rng)
    test = _manifest(tmp_path, "test", 3, rng)
    (tmp_path / "text.txt").write_text("\n".join(" ".join(rng.choice(WORDS, 4)) for _ in range(50)))
    out = tmp_path / "out"
    main(["align", "--train", str(train), "--manifests", str(train), str(test), "--output",
          str(out), "--oov-policy", "skip", "--iterations", "1", "--epochs", "1", "--hidden",
          "16", "--init", "ctc", "--ctc-epochs", "1"])
    report = json.loads((out / "align_report.json").read_text())
    assert report["test"]["alignment"]["aligned"] == 3 and report["test"]["oov"]["oov_rate"] == 0
    main(["build-tree", "--alignments", str(out / "train_phone_alignments.json"), "--manifest",
          str(train), "--aligner", str(out / "aligner.pt"), "--oov-policy", "skip", "--output",
          str(out / "tree.json"), "--min-count", "5", "--min-gain", "1"])
    tree = SenoneTree.load(out / "tree.json")
    # The shards folder align printed, read shard by shard: the same tree.
    printed = capsys.readouterr().out
    assert "aligned 3/3" in printed and f"shards in {out / 'train_shards'}" in printed
    main(["build-tree", "--shards", str(out / "train_shards"), "--manifest", str(train),
          "--aligner", str(out / "aligner.pt"), "--oov-policy", "skip", "--output",
          str(out / "tree_shards.json"), "--min-count", "5", "--min-gain", "1"])
    assert (out / "tree_shards.json").read_bytes() == (out / "tree.json").read_bytes()
    main(["export-units", "--alignments", str(out / "test_phone_alignments.json"), "--manifest",
          str(test), "--oov-policy", "skip", "--tree", str(out / "tree.json"), "--spm-dir",
          str(tmp_path / "spm"), "--spm-vocab-size", "12", "--spm-train-text",
          str(tmp_path / "text.txt"), "--output", str(out / "test.units")])
    main(["export-units", "--shards", str(out / "test_shards"), "--manifest", str(test),
          "--oov-policy", "skip", "--tree", str(out / "tree.json"), "--spm-dir",
          str(tmp_path / "spm"), "--spm-vocab-size", "12", "--output", str(out / "shards.units")])
    assert (out / "shards.units").read_bytes() == (out / "test.units").read_bytes()
    lexicon = Lexicon.from_cmudict()
    store = UnitStore(out / "test.units", expect={"lexicon": lexicon.hash, "tree": tree.hash})
    assert store.ids() == ["test0", "test1", "test2"]
    record = store["test0"]
    n_frames = FrameRate().frames_for_samples(soundfile.info(tmp_path / "test0.wav").frames)
    for unit in ("monophone", "senone", "subword"):
        assert len(record[f"{unit}.frame_to_position"]) == n_frames
    with open(test) as f:
        text = next(csv.DictReader(f))["wrd"]
    assert record["monophone.units"].tolist() == lexicon.phone_ids(text)
    assert record["senone.units"].tolist() == tree.senones(lexicon.phones(text))
    assert "3 utterances (0 without alignment)" in capsys.readouterr().out


def test_align_reads_the_users_lexicon_file(tmp_path):
    rng = np.random.default_rng(1)
    train = _manifest(tmp_path, "train", 8, rng)
    # LibriSpeech's layout (upper case, tabs); "ma" is left out, so it is out of vocabulary
    lexicon_file = tmp_path / "my-lexicon.txt"
    lexicon_file.write_text("SAM\tS AE1 M\nME\tM IY1\nMISS\tM IH1 S\nSEA\tS IY1\n")
    out = tmp_path / "out"
    main(["align", "--train", str(train), "--manifests", str(train), "--output", str(out),
          "--lexicon", str(lexicon_file), "--oov-policy", "g2p", "--iterations", "1",
          "--epochs", "1", "--hidden", "16", "--init", "ctc", "--ctc-epochs", "1"])
    report = json.loads((out / "align_report.json").read_text())["train"]
    with open(train) as f:
        with_ma = sum("ma" in row["wrd"].split() for row in csv.DictReader(f))
    assert report["oov"]["oov_types"] == 1 and report["oov"]["utterances_with_oov"] == with_ma
    assert (out / "train_oov.txt").read_text().startswith("ma\t")
    header = json.loads((out / "train_phone_alignments.json").read_text())["header"]
    assert header["lexicon"] == Lexicon.from_file(lexicon_file, oov_policy="g2p").hash
    assert header["lexicon"].startswith("my-lexicon.txt-")


def test_align_with_two_jobs_or_two_ranks_trains_and_aligns_the_same_bytes(tmp_path):
    # Two jobs train the phone model on two ranks of this machine, sharing its steps, as
    # two torchrun ranks do.
    train = _manifest(tmp_path, "train", 6, np.random.default_rng(2))
    common = ["align", "--train", str(train), "--manifests", str(train), "--oov-policy", "skip",
              "--iterations", "2", "--epochs", "1", "--hidden", "16", "--init", "ctc",
              "--ctc-epochs", "1"]
    for jobs in ("1", "2"):
        main([*common, "--jobs", jobs, "--output", str(tmp_path / f"jobs{jobs}")])
    run = subprocess.run(
        torchrun_command(["-m", "sb_crossmodal_kd.cli", *common, "--output",
                          str(tmp_path / "ranks")]),
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ("aligner.pt", "train_phone_alignments.json"):
        expected = (tmp_path / "jobs1" / name).read_bytes()
        assert (tmp_path / "jobs2" / name).read_bytes() == expected
        assert (tmp_path / "ranks" / name).read_bytes() == expected
