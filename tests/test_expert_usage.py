"""Expert-usage statistics, logging and heat maps."""

import itertools

import pytest
import torch
from host_reads import HostReads
from speechbrain.utils.train_logger import FileTrainLogger, TensorboardLogger

from sb_crossmodal_kd.analysis import expert_usage
from sb_crossmodal_kd.analysis.expert_usage import (
    ExpertUsageTracker,
    expert_usage_report,
    log_expert_usage,
    plot_expert_usage,
)
from sb_crossmodal_kd.nnet.dmoe import DeepMoE
from sb_crossmodal_kd.nnet.moe import padding_mask


def run_batches(model, tracker, batches=3, classes=3):
    """Feeds random batches; returns the (valid) assignment tuples and labels seen."""
    seen = []
    for _ in range(batches):
        x = torch.randn(3, 8, 6)
        lengths = torch.tensor([1.0, 0.75, 0.5])
        labels = torch.randint(-1, classes, (3, 8))
        model(x, lengths=lengths)
        tracker.update(model, labels=labels)
        assign = [layer.last_assignment for layer in model.layers]
        for b, t in itertools.product(range(3), range(8)):
            if assign[0][b, t] >= 0 and labels[b, t] >= 0:
                seen.append((tuple(int(a[b, t]) for a in assign), int(labels[b, t])))
    return seen


def test_joint_usage_combinations_and_classes_match_a_direct_count():
    torch.manual_seed(0)
    model = DeepMoE(6, num_layers=3, layer_size=6, num_experts=[2, 3, 2])
    tracker = ExpertUsageTracker(num_classes=3)
    seen = run_batches(model, tracker)
    summary = tracker.summary()
    assert summary["frames"] == len(seen)
    assert summary["num_combinations"] == 12
    assert summary["combinations_used"] == len({path for path, _ in seen})
    joint01 = [[0] * 3 for _ in range(2)]
    joint12 = [[0] * 2 for _ in range(3)]
    by_class = [[0] * 3 for _ in range(3)]
    for (a, b, c), label in seen:
        joint01[a][b] += 1
        joint12[b][c] += 1
        by_class[label][b] += 1
    assert summary["joint_usage"]["layers.0->layers.1"] == joint01
    assert summary["joint_usage"]["layers.1->layers.2"] == joint12
    assert summary["usage_by_class"]["layers.1"] == by_class


def test_sparse_combination_count_agrees_with_dense(monkeypatch):
    torch.manual_seed(0)
    model = DeepMoE(6, num_layers=3, layer_size=6, num_experts=[2, 3, 2])
    dense = ExpertUsageTracker()
    torch.manual_seed(1)
    run_batches(model, dense)
    monkeypatch.setattr(expert_usage, "MAX_DENSE_COMBINATIONS", 4)
    sparse = ExpertUsageTracker()
    torch.manual_seed(1)
    run_batches(model, sparse)
    assert isinstance(sparse.combination_counts, set)
    assert sparse.summary()["combinations_used"] == dense.summary()["combinations_used"]


def test_bad_labels_are_reported():
    model = DeepMoE(6, num_layers=2, layer_size=6, num_experts=2)
    tracker = ExpertUsageTracker(num_classes=2)
    model(torch.randn(1, 4, 6))
    with pytest.raises(ValueError, match="do not match"):
        tracker.update(model, labels=torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="num_classes=2"):
        tracker.update(model, labels=torch.full((1, 4), 2))


def test_update_reads_nothing_back_to_the_host_on_an_accelerator(monkeypatch):
    # The frame recipe calls update() every training batch.
    monkeypatch.setattr(expert_usage, "_reads_are_free", lambda device: False)
    model = DeepMoE(6, num_layers=2, layer_size=6, num_experts=3)
    tracker = ExpertUsageTracker(num_classes=4)
    lengths = torch.tensor([1.0, 0.5])
    for _ in range(2):
        with padding_mask(model, lengths=lengths):
            model(torch.randn(2, 8, 6))
        labels = torch.randint(-1, 4, (2, 8))
        with HostReads() as watch:
            tracker.update(model, labels=labels)
        assert watch.reads == []
    assert tracker.summary()["frames"] > 0


def test_labels_out_of_range_on_an_accelerator_are_reported_by_the_summary(monkeypatch):
    # On a GPU, checking every batch's labels would synchronise each training step: they
    # are counted on the device instead, left out of the tables, and reported at summary().
    monkeypatch.setattr(expert_usage, "_reads_are_free", lambda device: False)
    model = DeepMoE(6, num_layers=2, layer_size=6, num_experts=2)
    tracker = ExpertUsageTracker(num_classes=2)
    model(torch.randn(1, 4, 6))
    tracker.update(model, labels=torch.tensor([[0, 1, 2, 5]]))
    assert sum(int(t.sum()) for t in tracker.by_class) == 2 * 2  # two good frames, 2 layers
    restored = ExpertUsageTracker(num_classes=2)  # a mid-epoch checkpoint keeps the count
    restored.load_state(tracker.state())
    for tracked in (tracker, restored):
        with pytest.raises(ValueError, match="2 frame labels >= num_classes=2"):
            tracked.summary()


def test_report_is_logged_as_text_and_tensorboard_and_plotted(tmp_path):
    torch.manual_seed(0)
    model = DeepMoE(6, num_layers=2, layer_size=6, num_experts=3)
    tracker = ExpertUsageTracker(class_names=["a", "b", "c"])
    run_batches(model, tracker)
    report = expert_usage_report(model, tracker, reset=True)
    assert set(report["layers"]) == {"layers.0", "layers.1"}
    assert tracker.summary()["frames"] == 0  # reset
    assert report["layers"]["layers.0"]["frames"] == 3 * 18  # padding excluded

    text_log = tmp_path / "log.txt"
    log_expert_usage(FileTrainLogger(text_log), report, epoch=1)
    line = text_log.read_text()
    assert "layers.0 entropy" in line and "combinations used" in line

    tb_dir = tmp_path / "tb"
    log_expert_usage(TensorboardLogger(str(tb_dir)), report, epoch=1, stage="valid")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir), size_guidance={"images": 0})
    events.Reload()
    assert "layers.1 usage min/valid" in events.Tags()["scalars"]
    assert any("joint" in tag for tag in events.Tags()["images"])

    written = plot_expert_usage(report, tmp_path / "plots")
    names = sorted(p.name for p in written)
    assert "expert_usage_joint_layers_0_layers_1.png" in names
    assert "expert_usage_by_class_layers_1.png" in names
    for path in written:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in (tmp_path / "plots").iterdir() if p.name.startswith(".")]
