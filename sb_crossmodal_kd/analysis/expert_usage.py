"""Expert-usage analysis of MoE models, as Eigen et al. (2013) report it.

Per layer (from the layers' own counters, :func:`~sb_crossmodal_kd.nnet.moe.collect_expert_stats`):
mean gate mass per expert and gate entropy. Across layers (:class:`ExpertUsageTracker`, fed
after each forward pass): the joint usage matrix of consecutive layers by argmax expert, how
many of the N^L expert combinations occur, and usage by class when frame labels are given.
Padding frames (and frames labelled -1) are never counted.

A Brain typically calls ``tracker.update(model, labels)`` in ``compute_objectives`` and, at
the end of a stage, :func:`expert_usage_report`, :func:`log_expert_usage` (SpeechBrain's
loggers: text, and TensorBoard when enabled) and :func:`plot_expert_usage` (PNG heat maps).
"""

import math

import torch

from sb_crossmodal_kd.distributed import gather_objects, is_distributed, sum_across_processes
from sb_crossmodal_kd.io import atomic_path, atomic_write_json
from sb_crossmodal_kd.nnet.moe import collect_expert_stats, count_ids, moe_layers

MAX_DENSE_COMBINATIONS = 1 << 20  # beyond this, count distinct paths with a set


class ExpertUsageTracker:
    """Accumulates cross-layer expert-usage statistics of a model's MoE layers.

    Arguments
    ---------
    num_classes : int, optional
        Number of frame classes, for usage by class.
    class_names : list of str, optional
        Names of the classes (for plots and reports).

    Example
    -------
    >>> from sb_crossmodal_kd.nnet.dmoe import DeepMoE
    >>> model = DeepMoE(8, num_layers=2, layer_size=8, num_experts=3)
    >>> tracker = ExpertUsageTracker(num_classes=2)
    >>> _ = model(torch.randn(2, 6, 8), lengths=torch.tensor([1.0, 0.5]))
    >>> tracker.update(model, labels=torch.randint(0, 2, (2, 6)))
    >>> summary = tracker.summary()
    >>> summary["frames"], summary["num_combinations"]
    (9, 9)
    >>> sum(map(sum, summary["joint_usage"]["layers.0->layers.1"]))
    9
    """

    def __init__(self, num_classes=None, class_names=None):
        if class_names is not None and num_classes is None:
            num_classes = len(class_names)
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(
                f"class_names has {len(class_names)} names but num_classes={num_classes}"
            )
        self.num_classes = num_classes
        self.class_names = class_names
        self.reset()

    def reset(self):
        """Forgets everything accumulated."""
        self.layer_names = None
        self.num_experts = None
        self.frames = 0
        self._frames_tensor = None
        self.joint = []  # [N_l, N_l+1] count tensors
        self.by_class = []  # [C, N_l] count tensors
        self.combination_counts = None  # dense [prod N] counts, or a set of path codes

    def state(self):
        """What the tracker has accumulated, as CPU tensors and plain values (for a
        mid-epoch checkpoint); :meth:`load_state` puts it back.

        Example
        -------
        >>> from sb_crossmodal_kd.nnet.dmoe import DeepMoE
        >>> model = DeepMoE(8, num_layers=2, layer_size=8, num_experts=3)
        >>> tracker = ExpertUsageTracker()
        >>> _ = model(torch.randn(2, 6, 8))
        >>> tracker.update(model)
        >>> copy = ExpertUsageTracker()
        >>> copy.load_state(tracker.state())
        >>> copy.summary() == tracker.summary()
        True
        """
        if self.layer_names is None:
            return {"layer_names": None}
        combinations = self.combination_counts
        return {
            "layer_names": list(self.layer_names),
            "num_experts": list(self.num_experts),
            "frames": self._frames_tensor.cpu(),
            "labels_too_large": self._labels_too_large.cpu(),
            "joint": [m.cpu() for m in self.joint],
            "by_class": [t.cpu() for t in self.by_class],
            "combinations": (sorted(combinations) if isinstance(combinations, set)
                             else combinations.cpu()),
        }

    def load_state(self, state, device="cpu"):
        """Puts back what :meth:`state` returned, on ``device``."""
        self.reset()
        if state["layer_names"] is None:
            return
        self.layer_names = list(state["layer_names"])
        self.num_experts = list(state["num_experts"])
        self._frames_tensor = state["frames"].to(device)
        # states saved before this counter existed have none
        self._labels_too_large = state.get("labels_too_large", torch.tensor(0)).to(device)
        self.joint = [m.to(device) for m in state["joint"]]
        self.by_class = [t.to(device) for t in state["by_class"]]
        combinations = state["combinations"]
        self.combination_counts = (set(combinations) if isinstance(combinations, list)
                                   else combinations.to(device))

    def _start(self, layers, device):
        self.layer_names = [name or "moe" for name, _ in layers]
        self.num_experts = [layer.num_experts for _, layer in layers]
        self.joint = [
            torch.zeros(a, b, dtype=torch.long, device=device)
            for a, b in zip(self.num_experts[:-1], self.num_experts[1:], strict=True)
        ]
        if self.num_classes is not None:
            self.by_class = [
                torch.zeros(self.num_classes, n, dtype=torch.long, device=device)
                for n in self.num_experts
            ]
        total = math.prod(self.num_experts)
        if total <= MAX_DENSE_COMBINATIONS:
            self.combination_counts = torch.zeros(total, dtype=torch.long, device=device)
        else:
            self.combination_counts = set()
        self._frames_tensor = torch.zeros((), dtype=torch.long, device=device)
        self._labels_too_large = torch.zeros((), dtype=torch.long, device=device)

    @torch.no_grad()
    def update(self, model, labels=None):
        """Adds the routing of the model's latest forward pass.

        Arguments
        ---------
        model : torch.nn.Module
            The model whose MoE layers just ran (all on the same frames, e.g. a Deep MoE).
        labels : torch.Tensor, optional
            [B, T] class index per frame, -1 where there is none.
        """
        layers = moe_layers(model)
        if not layers:
            raise ValueError(f"{type(model).__name__} has no MoE layers to track")
        assignments = [layer.last_assignment for _, layer in layers]
        if any(a is None for a in assignments):
            raise ValueError(
                "update() must follow a forward pass of every MoE layer, built with "
                "track_stats=True (the default)"
            )
        shape = assignments[0].shape
        if any(a.shape != shape for a in assignments):
            raise ValueError(
                "the MoE layers ran on different frame grids "
                f"{[tuple(a.shape) for a in assignments]}; track them separately"
            )
        if self.layer_names is None:
            self._start(layers, assignments[0].device)
        elif [name or "moe" for name, _ in layers] != self.layer_names:
            raise ValueError("update() got a model with other MoE layers than before")
        # No boolean indexing (a device sync per call): frames that do not count get code -1,
        # which count_ids leaves out.
        valid = assignments[0] >= 0
        if labels is not None:
            if labels.shape != shape:
                raise ValueError(
                    f"labels of shape {tuple(labels.shape)} do not match the routed frames "
                    f"{tuple(shape)}"
                )
            labels = labels.to(valid.device)
            valid = valid & (labels >= 0)
        self._frames_tensor += valid.sum()
        for joint, a, b in zip(self.joint, assignments[:-1], assignments[1:], strict=True):
            n_b = joint.shape[1]
            joint += count_ids(torch.where(valid, a * n_b + b, -1), joint.numel()).view_as(joint)
        code = torch.zeros_like(assignments[0])
        for a, n in zip(assignments, self.num_experts, strict=True):
            code = code * n + a
        if isinstance(self.combination_counts, set):  # too many paths to count on the device
            self.combination_counts.update(torch.unique(code[valid]).tolist())
        else:
            self.combination_counts += count_ids(torch.where(valid, code, -1),
                                                 self.combination_counts.numel())
        if labels is not None and self.num_classes is not None:
            too_large = valid & (labels >= self.num_classes)
            if _reads_are_free(labels.device):  # checked at once where that costs no sync
                self._raise_for_labels(int(too_large.sum()), int(labels.max()))
            else:  # counted on the device, reported by summary()
                self._labels_too_large += too_large.sum()
            valid = valid & ~too_large
            for table, a in zip(self.by_class, assignments, strict=True):
                n = table.shape[1]
                codes = torch.where(valid, labels.long() * n + a, -1)
                table += count_ids(codes, table.numel()).view_as(table)

    def _raise_for_labels(self, count, largest=None):
        if count:
            example = "" if largest is None else f", the largest {largest}"
            raise ValueError(
                f"{count} frame labels >= num_classes={self.num_classes}{example}: give the "
                "tracker the number of classes the labels index"
            )

    def summary(self, across_processes=True):
        """Plain-Python summary (one device sync).

        Arguments
        ---------
        across_processes : bool
            Under DDP, sum the counts of all processes first (a collective: every rank must
            call it; every rank must have tracked the same layers). False for data every
            process saw in full (SpeechBrain's valid and test stages).

        Returns
        -------
        dict
            ``frames``; ``num_combinations`` (N^L); ``combinations_used`` (paths taken by at
            least one frame, by argmax expert per layer); ``joint_usage`` {"a->b": counts
            [N_a][N_b]}; ``usage_by_class`` {layer: counts [C][N]} when labels were given.
        """
        if self.layer_names is None:
            return {"frames": 0, "num_combinations": 0, "combinations_used": 0,
                    "joint_usage": {}, "usage_by_class": {}}
        frames, joint, by_class = self._frames_tensor, self.joint, self.by_class
        bad_labels = self._labels_too_large
        combinations = self.combination_counts
        if across_processes and is_distributed():
            dense = not isinstance(combinations, set)
            counts = [frames, bad_labels, *joint, *by_class] + ([combinations] if dense else [])
            counts = sum_across_processes(counts)
            frames, bad_labels, joint = counts[0], counts[1], counts[2 : 2 + len(joint)]
            by_class = counts[2 + len(joint) : 2 + len(joint) + len(by_class)]
            if dense:
                combinations = counts[-1]
            else:
                combinations = set().union(*gather_objects(combinations))
        self._raise_for_labels(int(bad_labels))  # on every rank, after the collective
        if isinstance(combinations, set):
            used = len(combinations)
        else:
            used = int((combinations > 0).sum())
        names = self.layer_names
        result = {
            "frames": int(frames),
            "num_combinations": math.prod(self.num_experts),
            "combinations_used": used,
            "joint_usage": {
                f"{a}->{b}": m.tolist()
                for a, b, m in zip(names[:-1], names[1:], joint, strict=True)
            },
            "usage_by_class": {
                n: t.tolist() for n, t in zip(names, by_class, strict=False)
            },  # empty without classes
        }
        if self.class_names is not None:
            result["class_names"] = list(self.class_names)
        return result


def _reads_are_free(device):
    """Whether reading a value of a tensor on ``device`` costs no device synchronisation."""
    return device.type == "cpu"


def expert_usage_report(model, tracker=None, reset=False, across_processes=True):
    """Per-layer statistics of ``model``'s MoE layers plus the tracker's cross-layer summary.

    Arguments
    ---------
    model : torch.nn.Module
        Model with MoE layers.
    tracker : ExpertUsageTracker, optional
        Cross-layer statistics to include.
    reset : bool
        Reset the layers' counters and the tracker after reading.
    across_processes : bool
        Under DDP, report the counts of all processes (a collective; see
        :meth:`ExpertUsageTracker.summary`). False for data every process saw in full.

    Returns
    -------
    dict
        ``{"layers": {name: MoE.stats()}, **tracker.summary()}``.
    """
    report = {"layers": collect_expert_stats(model, reset, across_processes)}
    if tracker is not None:
        report.update(tracker.summary(across_processes))
        if reset:
            tracker.reset()
    return report


def usage_results(report):
    """What a results file keeps of a report: expert paths (``num_combinations``,
    ``combinations_used``) and, per layer, ``usage`` (mean gate mass per expert) and
    ``gate_entropy``.

    Example
    -------
    >>> usage_results({"layers": {"l0": {"usage": [0.25, 0.75], "gate_entropy": 0.5}},
    ...                "num_combinations": 2, "combinations_used": 2})["usage"]
    {'l0': [0.25, 0.75]}
    """
    return {
        "num_combinations": report.get("num_combinations", 0),
        "combinations_used": report.get("combinations_used", 0),
        "usage": {name: stats["usage"] for name, stats in report["layers"].items()},
        "gate_entropy": {name: stats["gate_entropy"] for name, stats in report["layers"].items()},
    }


def usage_scalars(report):
    """Flat scalar view of a report for SpeechBrain's loggers.

    Example
    -------
    >>> usage_scalars({"layers": {"l0": {"usage": [0.25, 0.75], "gate_entropy": 0.5,
    ...                                  "max_entropy": 0.69, "frames": 4.0}}})
    {'l0 entropy': 0.5, 'l0 usage min': 0.25, 'l0 usage max': 0.75}
    """
    scalars = {}
    for name, stats in report["layers"].items():
        scalars[f"{name} entropy"] = round(stats["gate_entropy"], 4)
        scalars[f"{name} usage min"] = round(min(stats["usage"]), 4)
        scalars[f"{name} usage max"] = round(max(stats["usage"]), 4)
        if "dropped_fraction" in stats:
            scalars[f"{name} dropped"] = round(stats["dropped_fraction"], 4)
    if report.get("num_combinations"):
        scalars["combinations used"] = report["combinations_used"]
        scalars["combinations"] = report["num_combinations"]
    return scalars


def log_expert_usage(logger, report, epoch, stage="train"):
    """Logs a report through a SpeechBrain train logger (``FileTrainLogger``,
    ``TensorboardLogger``, ...) as scalars; TensorBoard also gets the heat maps as figures.

    Arguments
    ---------
    logger : speechbrain.utils.train_logger.TrainLogger
        The logger.
    report : dict
        From :func:`expert_usage_report`.
    epoch : int
        Epoch number for ``stats_meta``.
    stage : str
        "train", "valid" or "test".
    """
    scalars = usage_scalars(report)
    key = {"train": "train_stats", "valid": "valid_stats", "test": "test_stats"}[stage]
    logger.log_stats(stats_meta={"epoch": epoch}, **{key: scalars})
    writer = getattr(logger, "writer", None)
    if writer is not None and hasattr(writer, "add_figure"):
        for title, figure in _figures(report):
            writer.add_figure(f"expert_usage/{stage}/{title}", figure, global_step=epoch)


def _heatmap(matrix, title, xlabel, ylabel, yticklabels=None):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = len(matrix)
    figure = Figure(figsize=(max(4.0, 0.35 * len(matrix[0]) + 2), max(3.0, 0.22 * rows + 1.5)))
    axes = figure.add_subplot(1, 1, 1)
    image = axes.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest")
    figure.colorbar(image, ax=axes)
    axes.set_title(title, fontsize=9)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    if yticklabels is not None and rows <= 60:
        axes.set_yticks(range(rows))
        axes.set_yticklabels(yticklabels, fontsize=6)
    figure.tight_layout()
    return figure


def _normalise_rows(matrix):
    return [[v / max(sum(row), 1) for v in row] for row in matrix]


def _figures(report):
    """(file stem, matplotlib Figure) pairs for every heat map a report supports."""
    figures = []
    layers = report.get("layers", {})
    sizes = {len(s["usage"]) for s in layers.values()}
    if layers and len(sizes) == 1:
        figures.append((
            "layer_usage",
            _heatmap([s["usage"] for s in layers.values()], "mean gate mass per expert",
                     "expert", "layer", list(layers)),
        ))
    for pair, matrix in report.get("joint_usage", {}).items():
        total = max(sum(map(sum, matrix)), 1)
        a, b = pair.split("->")
        used = sum(v > 0 for row in matrix for v in row)
        figures.append((
            f"joint_{a}_{b}".replace(".", "_"),
            _heatmap([[v / total for v in row] for row in matrix],
                     f"joint usage (argmax), {used}/{len(matrix) * len(matrix[0])} pairs used",
                     f"expert of {b}", f"expert of {a}"),
        ))
    names = report.get("class_names")
    for layer, matrix in report.get("usage_by_class", {}).items():
        figures.append((
            f"by_class_{layer}".replace(".", "_"),
            _heatmap(_normalise_rows(matrix), f"{layer}: use by class (row-normalised)",
                     "expert", "class", names),
        ))
    return figures


def plot_expert_usage(report, output_dir, prefix="expert_usage"):
    """Writes every heat map of a report as PNG (and the report as JSON) into ``output_dir``.

    Returns
    -------
    list of pathlib.Path
        The files written.

    Example
    -------
    >>> import tempfile
    >>> report = {"layers": {"a": {"usage": [0.5, 0.5]}}, "joint_usage": {"a->b": [[1, 0], [2, 3]]}}
    >>> [p.name for p in plot_expert_usage(report, tempfile.mkdtemp())]
    ['expert_usage_layer_usage.png', 'expert_usage_joint_a_b.png', 'expert_usage.json']
    """
    from pathlib import Path

    output_dir = Path(output_dir)
    written = []
    for stem, figure in _figures(report):
        path = output_dir / f"{prefix}_{stem}.png"
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", dpi=120)
        written.append(path)
    json_path = output_dir / f"{prefix}.json"
    atomic_write_json(json_path, report)
    written.append(json_path)
    return written
