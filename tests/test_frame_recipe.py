"""The frame-level monophone recipe: one tiny epoch end to end, and fair model sizes."""

import importlib.util
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hyperpyyaml import load_hyperpyyaml

from sb_crossmodal_kd.alignment.corpus import save_alignments
from sb_crossmodal_kd.data.corpus import make_corpus
from sb_crossmodal_kd.units.phones import PHONES

RECIPE = Path(__file__).resolve().parents[1] / "recipes/SynthCommands/frame_classification"


def load_train_module():
    spec = importlib.util.spec_from_file_location("frame_train", RECIPE / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("frame_corpus")
    make_corpus(folder, progress=False, n_train=6, n_valid=2, n_test=2, n_text=20,
                n_text_valid=5, speakers=(2, 1, 1), seed=11)
    return folder


def test_compared_models_have_equal_parameter_counts(tmp_path):
    counts = {}
    for name in ("dmoe", "dense_mlp", "moe_single"):
        with open(RECIPE / "hparams" / f"{name}.yaml") as handle:  # checkpoints go in tmp_path
            hparams = load_hyperpyyaml(handle, {"data_folder": "unused",
                                                "output_folder": str(tmp_path / name)})
        counts[name] = sum(p.numel() for p in hparams["model"].parameters())
    assert max(counts.values()) / min(counts.values()) < 1.01, counts


def tiny_epoch(corpus, out):
    """Overrides for one epoch of batch 3, labels from the corpus's synthesiser timings (no
    aligner to train in a unit test)."""
    return {"data_folder": str(corpus), "output_folder": str(out), "number_of_epochs": 1,
            "batch_size": 3, "alignments_folder": str(corpus),
            "alignments_suffix": "_alignments.json"}


def test_one_tiny_epoch_reports_accuracy_and_expert_combinations(corpus, tmp_path):
    train = load_train_module()
    out = tmp_path / "dmoe"
    results = train.run(RECIPE / "hparams" / "dmoe.yaml", tiny_epoch(corpus, out))
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert 0.0 <= saved["frame_accuracy"] <= 1.0
    assert saved["labelled_frames"] > 100
    assert saved["num_combinations"] == 16
    assert 1 <= saved["combinations_used"] <= 16
    assert len(saved["usage"]) == 2
    heatmap = out / "expert_usage" / "expert_usage_joint_encoder_layers_0_encoder_layers_1.png"
    assert heatmap.read_bytes()[:4] == b"\x89PNG"
    log = (out / "train_log.txt").read_text()
    assert "frame_acc" in log and "combinations used" in log


@pytest.mark.slow
def test_speechbrain_compile_trains_the_deep_moe_under_the_same_layer_names(corpus, tmp_path):
    # --compile: SpeechBrain wraps the model in torch.compile's module (inductor, C++ code);
    # the balancing constraint of phase one runs beside the compiled graph
    train = load_train_module()
    out = tmp_path / "compiled"
    results = train.run(RECIPE / "hparams" / "dmoe.yaml", tiny_epoch(corpus, out),
                        run_opts={"compile": True, "compile_mode": "default"})
    assert sorted(results["usage"]) == ["encoder.layers.0", "encoder.layers.1"]
    assert results["num_combinations"] == 16 and 1 <= results["combinations_used"] <= 16
    assert 0.0 <= results["frame_accuracy"] <= 1.0
    assert (out / "expert_usage" / "expert_usage_joint_encoder_layers_0_encoder_layers_1.png"
            ).read_bytes()[:4] == b"\x89PNG"
    assert "train encoder.layers.0 entropy" in (out / "train_log.txt").read_text()


def test_frame_labels_follow_the_phone_timings(corpus):
    train = load_train_module()
    hparams = {"sample_rate": 16000, "alignment_tolerance": 2,
               "alignments_folder": str(corpus), "alignments_suffix": "_alignments.json",
               **{f"{s}_csv": str(corpus / f"{s}.csv") for s in ("train", "valid", "test")}}
    datasets = train.dataio_prepare(hparams)
    alignments = json.loads((corpus / "valid_alignments.json").read_text())
    item = datasets["valid"][0]
    labels = item["frame_labels"]
    assert len(labels) == 1 + len(item["sig"]) // 160
    for phone, start, end in alignments[item["id"]]["phones"]:
        if end - start < 0.02:  # too short to own a frame centre for sure
            continue
        centre = (start + end) / 2
        assert PHONES[int(labels[int(round(centre / 0.01))])] == phone


def test_forced_alignments_are_read_and_skipped_utterances_left_out(corpus, tmp_path, caplog):
    # sbkd align output (save_alignments) with the corpus's timings as segments; the aligner
    # skipped one valid utterance, and another has no alignment at all
    train = load_train_module()
    align = tmp_path / "align"
    for split in ("train", "valid", "test"):
        timings = json.loads((corpus / f"{split}_alignments.json").read_text())
        ids = sorted(timings)
        skipped = [(ids[0], "OOV word 'preheat'")] if split == "valid" else []
        found = {
            utt: SimpleNamespace(phones=[], feature_positions=np.zeros(0, dtype=np.int32),
                                 words=[], phone_segments=entry["phones"])
            for utt, entry in timings.items() if utt not in dict(skipped)
        }
        save_alignments(align / f"{split}_phone_alignments.json", found,
                        {"lexicon": "x", "report": {"skipped": skipped}})
    hparams = {"sample_rate": 16000, "alignment_tolerance": 2, "alignments_folder": str(align),
               "alignments_suffix": "_phone_alignments.json",
               **{f"{s}_csv": str(corpus / f"{s}.csv") for s in ("train", "valid", "test")}}
    with caplog.at_level(logging.WARNING):
        datasets = train.dataio_prepare(hparams)
    assert "1 utterances the aligner skipped are left out" in caplog.text
    assert len(datasets["valid"]) == 1 and len(datasets["train"]) == 6
    timings = json.loads((corpus / "valid_alignments.json").read_text())
    item = datasets["valid"][0]
    assert item["frame_labels"].tolist() == train.phone_frame_labels(
        timings[item["id"]]["phones"], len(item["sig"]), train.FrameRate(), item["id"]).tolist()

    payload = json.loads((align / "test_phone_alignments.json").read_text())
    payload["utterances"].pop(sorted(payload["utterances"])[0])  # not aligned, not skipped
    (align / "test_phone_alignments.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="1 utterances have no alignment.*sbkd align"):
        train.dataio_prepare(hparams)


def test_missing_alignments_are_reported(corpus, tmp_path):
    train = load_train_module()
    hparams = {"sample_rate": 16000, "alignment_tolerance": 2, "alignments_folder": str(tmp_path),
               "alignments_suffix": "_phone_alignments.json",
               **{f"{s}_csv": str(corpus / f"{s}.csv") for s in ("train", "valid", "test")}}
    with pytest.raises(FileNotFoundError, match="train_phone_alignments.json is missing.*sbkd"):
        train.dataio_prepare(hparams)
