"""The ablation of hierarchical distillation: every condition, paired seeds, one table.

:func:`run_ablation` prepares the KD data
(:func:`~sb_crossmodal_kd.prep.chain.prepare_kd_data`), trains and tests every condition of
the KD recipe (``recipes/SynthCommands/KD``) for the same seeds, and writes to its output
folder:

- ``ablation.json``: ``{"conditions": {name: entry}, "seeds": [...], "settings": {...},
  "prep_s": ...}``; each entry has ``wer_mean``, ``wer_std``, ``cer_mean``, ``cer_std`` (%,
  std over seeds, ``null`` with one seed), ``train_s`` (mean wall time of a run: training
  and test; ``train_s_partial`` when a run was resumed and so timed in part), ``params`` (inference model, heads dropped), ``params_with_heads``, the paired
  difference to the AM alone of the same encoder (``delta_wer_mean``, ``delta_wer_std``:
  seed by seed, so shared seed noise cancels) and ``per_seed`` values; rewritten as each run
  finishes, over the seeds every condition has finished, with ``partial`` (runs finished
  and planned) until all have;
- ``ablation.md``: the same as a Markdown table, and the teachers' table (held-out
  perplexity by epoch, mean entropy on the train positions: :func:`teacher_summary`);
- ``ablation.png``: WER per condition with the seed std as error bars, dense vs MoE encoder.

Runs live in ``runs/<condition>/<seed>/`` (SpeechBrain's output folder) and each finished one
leaves ``run.json`` (its overrides, results, valid curve and the commit it ran at); a run
with that file is not run again, and an interrupted one resumes
from its last epoch checkpoint, so the driver can be stopped and restarted at any point.

Conditions (Lee and Chang 2021, and the controls): ``am_alone``, ``label_interpolation``, ``aux_subword``,
``hierarchy``, ``hierarchy_no_lm`` (its control: the same heads on hard labels, no teacher),
``hierarchy_minus_senone``, ``hierarchy_minus_monophone``, ``hierarchy_minus_subword``, and
each with ``_moe`` (MoE feed-forward modules in the Conformer).
"""

import logging
import math
import os
import tempfile
import time
from pathlib import Path

from sb_crossmodal_kd.hparams import KD_CONDITIONS
from sb_crossmodal_kd.io import (
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    exclusive_folder,
)
from sb_crossmodal_kd.prep.chain import STEPS, prepare_kd_data
from sb_crossmodal_kd.prep.provenance import Provenance
from sb_crossmodal_kd.prep.settings import prep_settings
from sb_crossmodal_kd.revision import source_revision
from sb_crossmodal_kd.workers import process_pool, stop

logger = logging.getLogger(__name__)

__all__ = ["CONDITIONS", "DEMO_TRAINING", "condition_recipe", "run_ablation", "summarize",
           "markdown_table", "last_quarter_gain", "last_quarter_trend", "TREND_NOTE", "FLAT_GAIN", "is_flat",
           "paired_difference", "teacher_summary", "teacher_table", "plot_ablation", "save_wer_plot", "paired_seeds",
           "write_ablation_result"]

DENSE_CONDITIONS = (
    "am_alone",
    "label_interpolation",
    "aux_subword",
    "hierarchy",
    "hierarchy_no_lm",
    "hierarchy_minus_senone",
    "hierarchy_minus_monophone",
    "hierarchy_minus_subword",
)
CONDITIONS = DENSE_CONDITIONS + tuple(f"{name}_moe" for name in DENSE_CONDITIONS)
MOE_SUFFIX = "_moe"
FIRST_SEED = 1986

# Recipe overrides for `sbkd demo` (five conditions, 1 seed, 2 CPU cores), chosen on valid:
# narrower convolution front end (a third less time per epoch), no dropout (SpecAugment
# regularises; dropout cost a sixth of a step and slowed learning), 40-second batches (an
# epoch a fifth cheaper than 20-second ones, which learned no faster per epoch), 20 epochs at
# lr 0.01 after a 500-step warm-up (the AM alone's valid WER 30.7 after 20 epochs, against
# 32.8 after 24 at lr 0.005 with 100 steps; lr 0.01 after 100 steps stayed on CTC's plateau
# for 8 epochs), with base.yaml's schedule decaying to zero over these epochs. See the KD
# recipe's README.
DEMO_TRAINING = {"number_of_epochs": 20, "d_model": 64, "num_layers": 3, "d_ffn": 256,
                 "front_channels": [16, 16], "dropout": 0.0, "max_batch_seconds": 40,
                 "lr": 0.01, "warmup_steps": 500}


def paired_seeds(n):
    """The seeds of an ``n``-seed study; every condition runs the same ones.

    Example
    -------
    >>> paired_seeds(3)
    [1986, 1987, 1988]
    """
    if n < 1:
        raise ValueError(f"seeds must be at least 1, got {n}")
    return [FIRST_SEED + i for i in range(n)]


def condition_recipe(name):
    """The hparams file and overrides of condition ``name``.

    Example
    -------
    >>> path, overrides = condition_recipe("hierarchy_minus_senone_moe")
    >>> path.name, overrides
    ('hierarchy_minus_senone.yaml', {'condition': 'hierarchy_minus_senone_moe', 'use_moe': True})
    >>> condition_recipe("hierarchy_minus_lexicon")
    Traceback (most recent call last):
    ...
    ValueError: Unknown condition 'hierarchy_minus_lexicon'; choose from am_alone, ...
    """
    if name not in CONDITIONS:
        raise ValueError(f"Unknown condition {name!r}; choose from {', '.join(CONDITIONS)}")
    moe = name.endswith(MOE_SUFFIX)
    family = name[: -len(MOE_SUFFIX)] if moe else name
    return KD_CONDITIONS / f"{family}.yaml", {"condition": name, "use_moe": moe}


def _run_one(name, seed, run_dir, common, run_opts):
    """Trains and tests one condition with one seed; writes and returns ``run.json``."""
    from sb_crossmodal_kd.experiment import run_asr_experiment

    hparams_file, _ = condition_recipe(name)
    overrides = _run_overrides(name, seed, run_dir, common)
    record = _run_record(run_dir, overrides)
    # A run continued from a checkpoint is timed for its remainder only: flag it.
    resumed = any((run_dir / "save").glob("CKPT+*"))
    start = time.time()
    results = run_asr_experiment(hparams_file, overrides, run_opts)
    record.write(
        condition=name,
        seed=seed,
        wer=results["wer"],
        cer=results["cer"],
        train_s=round(time.time() - start, 1),
        resumed=resumed,
        params=results["params"],
        params_with_heads=results.get("params_with_heads", results["params"]),
        epochs=results["epochs"],
        test_utterances=results["utterances"],
        valid_wer_curve=results.get("valid_wer_curve", []),
        commit=source_revision(),
        device=run_opts.get("device", "cpu"),
    )
    return record.data


def _run_overrides(name, seed, run_dir, common):
    """The recipe overrides of one run: ``common``, the condition's and the run's own."""
    _, overrides = condition_recipe(name)
    return {**common, **overrides, "seed": seed, "output_folder": str(run_dir)}


def _run_record(run_dir, overrides):
    """``run.json`` of a run: its ``overrides`` and, once it has finished, its results; a run
    trained with other overrides is refused."""
    return Provenance(run_dir / "run.json", overrides, f"{run_dir / 'run.json'}: this run was made",
                      nested="overrides",
                      remedy="Use another output folder, or delete the runs to redo")


class _Runs:
    """Runs :func:`_run_one` calls, ``jobs`` at a time in worker processes (``jobs <= 1``: one
    after the other, in this process, when :meth:`results` is asked for). Runs can be
    submitted while this process does other work, e.g. the rest of the data chain."""

    def __init__(self, jobs):
        self.jobs, self.pool, self.submitted = jobs, None, {}
        self.threads = max(1, (os.cpu_count() or 1) // max(1, jobs))

    def __enter__(self):
        if self.jobs > 1:
            self.pool = process_pool(self.jobs, self.threads)
        return self

    def submit(self, todo):
        for args in todo:
            self.submitted[(args[0], args[1])] = (
                self.pool.submit(_run_one, *args) if self.pool else args)

    def results(self, finished=None):
        """Every submitted run's record; ``finished(key, record)`` is called as each ends."""
        from concurrent.futures import as_completed

        records = {}
        if self.pool:
            keys = {future: key for key, future in self.submitted.items()}
            done = ((keys[future], future.result()) for future in as_completed(keys))
        else:
            done = self._one_after_the_other()
        for key, record in done:
            records[key] = record
            if finished is not None:
                finished(key, record)
        return records

    def _one_after_the_other(self):
        for key, run in self.submitted.items():
            logger.info("ablation: %s, seed %d", *key)
            yield key, _run_one(*run)

    def __exit__(self, *error):
        if self.pool is None:
            return
        if error[0] is not None:
            # Stopped by an error elsewhere (e.g. the data chain): do not wait for the runs in
            # flight to finish; each resumes from its last epoch checkpoint next time.
            stop(self.pool)
        else:
            self.pool.shutdown()


def _reads_teachers(name, common):
    """Whether condition ``name`` distils from a teacher (needs the unit LMs and caches)."""
    from sb_crossmodal_kd.experiment import load_hparams
    from sb_crossmodal_kd.kd_data import teacher_unit_types

    hparams_file, overrides = condition_recipe(name)
    # Building the hparams makes the checkpoint folder: a scratch one, not results/ in the cwd
    with tempfile.TemporaryDirectory(prefix="sbkd-condition-") as scratch:
        hparams = load_hparams(hparams_file, {**common, **overrides, "output_folder": scratch})
        return bool(teacher_unit_types(hparams))


def last_quarter_gain(curve):
    """Relative improvement of valid WER over the last quarter of the epochs (0.02 = 2 %).

    A converged run improves little there: its best WER of the last quarter against the WER
    just before it. ``None`` for a curve shorter than two epochs.

    Example
    -------
    >>> last_quarter_gain([90.0, 60.0, 50.0, 45.0, 44.0, 44.0, 43.5, 43.0])
    0.0227
    """
    if len(curve) < 2:
        return None
    quarter = max(1, len(curve) // 4)
    before = curve[-quarter - 1]
    return round((before - min(curve[-quarter:])) / before, 4) if before else 0.0


def last_quarter_trend(curve):
    """Relative fall of the mean valid WER from the first half of the last quarter of the
    epochs to its second half (0.02 = 2 % lower): the curve's trend there, which, unlike
    :func:`last_quarter_gain` (its best epoch against one epoch), epoch-to-epoch noise does
    not push up. ``None`` when the last quarter has fewer than two epochs.

    Example
    -------
    >>> last_quarter_trend([90.0, 60.0, 50.0, 45.0, 44.0, 44.0, 43.5, 43.0])
    0.0115
    >>> last_quarter_trend([50.0, 40.0, 30.0]) is None
    True
    """
    quarter = len(curve) // 4
    if quarter < 2:
        return None
    half = quarter // 2
    first = sum(curve[-quarter:][:half]) / half
    second = sum(curve[-half:]) / half
    return round((first - second) / first, 4) if first else 0.0


# How tables explain :func:`last_quarter_trend`.
TREND_NOTE = ("the valid trend, the fall of the mean valid WER from the first half of the last ¼ "
              "of the epochs to its second half, which noise between epochs does not push up as "
              "it does the gain (a best epoch against one epoch).")

# A run counts as converged when its valid WER improves by less than this (relative) over the
# last quarter of its epochs.
FLAT_GAIN = 0.03


def is_flat(curve, threshold=FLAT_GAIN):
    """Whether a valid WER curve is flat at the end (:func:`last_quarter_gain` below
    ``threshold``); None for a curve too short to tell.

    Example
    -------
    >>> is_flat([90.0, 60.0, 50.0, 45.0, 44.0, 44.0, 43.5, 43.0])
    True
    >>> is_flat([90.0, 60.0, 50.0, 40.0]), is_flat([50.0])
    (False, None)
    """
    gain = last_quarter_gain(curve)
    return None if gain is None else gain < threshold


def _mean_std(values):
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    if len(values) < 2:
        return round(mean, 3), None
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return round(mean, 3), round(math.sqrt(var), 3)


def summarize(records, conditions, seeds):
    """One entry per condition from the runs' records (see the module docstring).

    Arguments
    ---------
    records : dict
        ``{(condition, seed): run record}`` with ``wer``, ``cer``, ``train_s``, ``params``.
    conditions : list of str
    seeds : list of int

    Example
    -------
    >>> records = {("am_alone", 1): {"wer": 40.0, "cer": 20.0, "train_s": 10, "params": 5},
    ...            ("am_alone", 2): {"wer": 44.0, "cer": 22.0, "train_s": 12, "params": 5},
    ...            ("hierarchy", 1): {"wer": 37.0, "cer": 18.0, "train_s": 11, "params": 5},
    ...            ("hierarchy", 2): {"wer": 42.0, "cer": 21.0, "train_s": 13, "params": 5}}
    >>> entry = summarize(records, ["am_alone", "hierarchy"], [1, 2])["hierarchy"]
    >>> entry["wer_mean"], entry["wer_std"], entry["delta_wer_mean"], entry["delta_wer_std"]
    (39.5, 3.536, -2.5, 0.707)
    """
    summary = {}
    for name in conditions:
        runs = [records[(name, seed)] for seed in seeds]
        entry = {}
        for metric in ("wer", "cer"):
            entry[f"{metric}_mean"], entry[f"{metric}_std"] = _mean_std([r[metric] for r in runs])
        entry["train_s"] = round(sum(r["train_s"] for r in runs) / len(runs), 1)
        entry["train_s_partial"] = any(r.get("resumed", False) for r in runs)
        entry["params"] = runs[0]["params"]
        entry["params_with_heads"] = runs[0].get("params_with_heads", runs[0]["params"])
        reference = "am_alone" + (MOE_SUFFIX if name.endswith(MOE_SUFFIX) else "")
        if reference in conditions:
            deltas = [records[(name, s)]["wer"] - records[(reference, s)]["wer"] for s in seeds]
            entry["reference"] = reference
            entry["delta_wer_mean"], entry["delta_wer_std"] = _mean_std(deltas)
        entry["wer"] = [r["wer"] for r in runs]
        entry["cer"] = [r["cer"] for r in runs]
        entry["per_seed"] = {
            str(seed): {**{key: r[key] for key in ("wer", "cer", "train_s", "epochs",
                                                   "valid_wer_curve", "commit", "device")
                           if key in r},
                        "valid_last_quarter_gain": last_quarter_gain(r.get("valid_wer_curve", []))}
            for seed, r in zip(seeds, runs, strict=True)
        }
        summary[name] = entry
    return summary


def paired_difference(summary, condition, reference, metric="wer"):
    """Mean and std over seeds of ``condition`` minus ``reference``, seed by seed, from the
    ``per_seed`` values of a :func:`summarize` summary (std None with one seed).

    Example
    -------
    >>> summary = {"hierarchy": {"per_seed": {"1": {"wer": 30.0}, "2": {"wer": 33.0}}},
    ...            "hierarchy_no_lm": {"per_seed": {"1": {"wer": 32.0}, "2": {"wer": 34.0}}}}
    >>> paired_difference(summary, "hierarchy", "hierarchy_no_lm")
    (-1.5, 0.707)
    """
    runs, references = summary[condition]["per_seed"], summary[reference]["per_seed"]
    seeds = sorted(set(runs) & set(references))
    if not seeds:
        raise ValueError(f"{condition} and {reference} share no seed: nothing to pair")
    return _mean_std([runs[seed][metric] - references[seed][metric] for seed in seeds])


def _pm(mean, std, digits=2):
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def markdown_table(summary, seeds):
    """The summary as a Markdown table (WER/CER in %, paired delta to the AM alone).

    Example
    -------
    >>> table = markdown_table({"am_alone": {"wer_mean": 40.0, "wer_std": None,
    ...     "cer_mean": 20.0, "cer_std": None, "train_s": 10.0, "params": 1000}}, [1986])
    >>> print(table.splitlines()[2])
    | am_alone | 40.00 | 20.00 | - | - | - | 10 | 1,000 |
    """
    seed_text = f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''} ({', '.join(map(str, seeds))})"
    lines = [
        "| condition | WER % | CER % | ΔWER vs AM alone (paired) | valid WER % at the end "
        "| valid gain, last ¼ of epochs | train s | params |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in summary.items():
        delta = "-"
        if "delta_wer_mean" in entry and name != entry.get("reference"):
            delta = _pm(entry["delta_wer_mean"], entry["delta_wer_std"])
        runs = list(entry.get("per_seed", {}).values())
        ends = [r["valid_wer_curve"][-1] for r in runs if r.get("valid_wer_curve")]
        gains = [r["valid_last_quarter_gain"] for r in runs
                 if r.get("valid_last_quarter_gain") is not None]
        end = f"{sum(ends) / len(ends):.2f}" if ends else "-"
        gain = f"{100 * max(gains):.1f} %" if gains else "-"  # the least converged seed
        lines.append(
            f"| {name} | {_pm(entry['wer_mean'], entry['wer_std'])} "
            f"| {_pm(entry['cer_mean'], entry['cer_std'])} | {delta} | {end} | {gain} "
            f"| {entry['train_s']:.0f}{'*' if entry.get('train_s_partial') else ''} "
            f"| {entry['params']:,} |"
        )
    lines.append("")
    lines.append(f"Mean ± std over {seed_text}; the same seeds for every condition. Test WER "
                 "of the epoch with the best valid WER; the valid gain is the relative "
                 "improvement over the last quarter of the epochs (small: converged).")
    if any(entry.get("train_s_partial") for entry in summary.values()):
        lines.append("* includes a run resumed from a checkpoint, timed for its remainder only.")
    return "\n".join(lines) + "\n"


def teacher_summary(outputs):
    """Per unit type: the teacher's held-out perplexity (final, and after every epoch) and
    how far its targets on the train positions are from one-hot (``mean_entropy`` in nats,
    ``mean_top1``), from the outputs of :func:`~sb_crossmodal_kd.prep.chain.prepare_kd_data`."""
    ppl = outputs.get("lm_valid_ppl") or {}
    curves = outputs.get("lm_valid_ppl_curve") or {}
    stats = outputs.get("teacher_statistics") or {}
    return {unit: {"valid_ppl": ppl.get(unit), "valid_ppl_curve": curves.get(unit, []),
                   **stats.get(unit, {})} for unit in ppl}


def teacher_table(teachers):
    """The teachers as a Markdown table.

    Example
    -------
    >>> print(teacher_table({"senone": {"valid_ppl": 1.21, "valid_ppl_curve": [1.4, 1.25, 1.21],
    ...     "mean_entropy": 0.25, "mean_top1": 0.93}}).splitlines()[2])
    | senone | 1.21 | 1.4 1.25 1.21 | 0.25 | 0.93 |
    """
    lines = ["| teacher | valid ppl | valid ppl by epoch | mean entropy (nats) | mean top-1 |",
             "|---|---|---|---|---|"]
    for unit, entry in teachers.items():
        curve = " ".join(f"{value:g}" for value in entry.get("valid_ppl_curve", []))
        entropy, top1 = entry.get("mean_entropy"), entry.get("mean_top1")
        lines.append(f"| {unit} | {entry.get('valid_ppl')} | {curve or '-'} "
                     f"| {'-' if entropy is None else f'{entropy:.2f}'} "
                     f"| {'-' if top1 is None else f'{top1:.2f}'} |")
    lines.append("")
    lines.append("Entropy and top-1 probability of each teacher on the train positions its head "
                 "distils (0 nats: one-hot targets).")
    return "\n".join(lines) + "\n"


def plot_ablation(summary, path):
    """Bar plot of WER per condition (seed std as error bars), dense and MoE side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = [n for n in DENSE_CONDITIONS
                if n in summary or n + MOE_SUFFIX in summary]
    width = 0.4
    fig, ax = plt.subplots(figsize=(1.2 * len(families) + 2, 4))
    for offset, suffix, label in ((-width / 2, "", "Conformer"),
                                  (width / 2, MOE_SUFFIX, "Conformer + MoE FFN")):
        xs, means, stds = [], [], []
        for i, family in enumerate(families):
            entry = summary.get(family + suffix)
            if entry is not None:
                xs.append(i + offset)
                means.append(entry["wer_mean"])
                stds.append(entry["wer_std"] or 0.0)
        if xs:
            ax.bar(xs, means, width, yerr=stds, capsize=3, label=label)
    ax.set_xticks(range(len(families)))
    ax.set_xticklabels([f.replace("hierarchy_minus_", "hier. - ").replace("_", " ")
                        for f in families], rotation=30, ha="right")
    save_wer_plot(fig, ax, "Hierarchical cross-modal distillation: ablation", path)


def save_wer_plot(fig, ax, title, path):
    """Labels a plot of test WER (y axis, ``title``, legend) and writes it to ``path`` (PNG,
    atomically); closes the figure."""
    import matplotlib.pyplot as plt

    ax.set_ylabel("test WER %")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def run_ablation(
    output_dir,
    seeds=1,
    conditions=None,
    prep=None,
    training=None,
    device="cpu",
    jobs=1,
    progress=False,
    prepared_dir=None,
):
    """Runs the ablation (resumable) and writes ``ablation.json``, ``.md`` and ``.png``.

    Arguments
    ---------
    output_dir : str or Path
        Everything goes here: ``data/`` (corpus), ``prep/`` (KD data), ``runs/``, results.
    seeds : int
        Seeds per condition (:func:`paired_seeds`: the same for every condition).
    conditions : list of str, optional
        Subset of :data:`CONDITIONS` (default: all, in that order).
    prep : dict, optional
        Data-chain settings overriding :data:`~sb_crossmodal_kd.prep.settings.PREP_DEFAULTS`
        (e.g. ``{"corpus": {"n_train": 1200}}``).
    training : dict, optional
        Recipe overrides for every run (default :data:`DEMO_TRAINING`), e.g.
        ``{"number_of_epochs": 20, "d_model": 144}``.
    device : str
        ``cpu`` or ``cuda:0``.
    jobs : int
        Processes at once, each with ``cpu_count // jobs`` threads: runs side by side, each
        in its own process (small models use CPU cores better this way), and while the unit
        LMs train, ``jobs - 1`` runs that need no teacher beside them.
    progress : bool
        Progress bars of the data chain.
    prepared_dir : str or Path, optional
        The folder of ``data/`` and ``prep/`` (default ``output_dir``): ablations that differ
        only in training (e.g. the train-set size) share one corpus, its KD data and teachers.

    Returns
    -------
    dict
        The content of ``ablation.json``.
    """
    output_dir = Path(output_dir).resolve()
    conditions = list(conditions or CONDITIONS)
    for name in conditions:
        condition_recipe(name)  # unknown names fail before hours of work
    seed_list = paired_seeds(seeds)
    settings = prep_settings(**(prep or {}))
    training = dict(DEMO_TRAINING if training is None else training)
    prepared_dir = output_dir if prepared_dir is None else Path(prepared_dir).resolve()

    # Two drivers on one folder would train the same runs at once.
    with exclusive_folder(output_dir):
        workers = os.cpu_count() or 1
        # Up to the unit stores: all that a condition without teachers trains on.
        prepared = prepare_kd_data(prepared_dir / "data", prepared_dir / "prep", settings,
                                   progress=progress, device=device, jobs=workers,
                                   through="unit_stores")
        steps = dict(prepared["steps"])
        common = {
            "data_folder": str(prepared_dir / "data"),
            "prep_folder": str(prepared_dir / "prep"),
            "vocab_size": prepared["outputs"].get("vocab_size", settings["vocab_size"]),
            **training,
        }
        records, todo = {}, []
        # Seed-major order: a study stopped early still has every condition for its first
        # seeds. Within a seed the slower MoE runs go first, so parallel jobs finish close
        # together.
        by_cost = sorted(conditions, key=lambda name: not name.endswith(MOE_SUFFIX))
        for seed in seed_list:
            for name in by_cost:
                run_dir = output_dir / "runs" / name / str(seed)
                record = _run_record(run_dir, _run_overrides(name, seed, run_dir, common))
                if record.found:  # finished (with these overrides: else refused)
                    records[(name, seed)] = record.data
                else:
                    todo.append((name, seed, run_dir, common, {"device": device}))
        # Runs without teachers train while the unit LMs do, in all slots but one; the LMs
        # take that one, so no more processes than slots ever compete for the cores (five
        # one-thread runs on two cores cost 16 % more CPU per step than two). Results do not
        # depend on this: each run has its own seed and process.
        early = [args for args in todo if not _reads_teachers(args[0], common)][:max(0, jobs - 1)]
        with _Runs(jobs) as runs:
            runs.submit(early)
            prepared = prepare_kd_data(prepared_dir / "data", prepared_dir / "prep", settings,
                                       progress=progress, device=device, jobs=workers,
                                       lm_cores=max(1, workers - len(early) * runs.threads))
            steps.update({step: prepared["steps"][step] for step in STEPS
                          if step not in steps and step in prepared["steps"]})
            runs.submit([args for args in todo if args not in early])

            def write_so_far(key, record):
                records[key] = record
                write_ablation_result(output_dir, records, conditions, seed_list, settings,
                                      training, device, steps, prepared["outputs"])

            runs.results(finished=write_so_far)
        return write_ablation_result(output_dir, records, conditions, seed_list, settings,
                                     training, device, steps, prepared["outputs"])


def write_ablation_result(output_dir, records, conditions, seeds, settings, training, device, steps,
                  outputs):
    """Writes ``ablation.json``, ``.md`` and ``.png`` of the seeds every condition finished
    (``partial`` while runs are missing, so a stopped study still has its table); returns
    the result, or None when no seed is complete yet."""
    complete = [seed for seed in seeds if all((name, seed) in records for name in conditions)]
    if not complete:
        return None
    finished = sum((name, seed) in records for name in conditions for seed in seeds)
    summary = summarize(records, conditions, complete)
    result = {
        "format": "sbkd-ablation-1",
        "conditions": summary,
        "condition_order": conditions,
        "seeds": complete,
        "settings": {"prep": settings, "training": training, "device": device},
        "prep_s": round(sum(steps.values()), 1),
        "prep_steps_s": steps,
        "lm_valid_ppl": outputs.get("lm_valid_ppl"),
        "n_senones": outputs.get("n_senones"),
        "teachers": teacher_summary(outputs),
    }
    if complete != seeds:
        result["partial"] = {"planned_seeds": seeds, "finished_runs": finished,
                             "planned_runs": len(conditions) * len(seeds)}
    atomic_write_json(output_dir / "ablation.json", result)
    atomic_write_text(output_dir / "ablation.md", markdown_table(summary, complete)
                      + "\n" + teacher_table(result["teachers"]))
    plot_ablation(summary, output_dir / "ablation.png")
    return result
