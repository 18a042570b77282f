"""How the gain of distillation depends on the amount of paired data: one ablation per
train-set size, on one corpus and one set of teachers.

:func:`run_scaling` prepares one corpus and its KD data in ``OUTPUT/data`` and ``OUTPUT/prep``
(aligner, senone tree, tokenizer, unit LMs and teacher caches: the same for every size), then
runs :func:`~sb_crossmodal_kd.ablation.run_ablation` for each size N into
``OUTPUT/paired_<N>/`` with the recipe's ``n_train_utterances: N``: every condition and seed
trains on the first N train utterances of the manifest
(:func:`~sb_crossmodal_kd.kd_data.first_utterances`), and validates and tests on the same
valid and test sets. It writes

- ``scaling.json``: ``{"paired": {N: {"utterances", "hours", "ids_sha1", "epochs",
  "conditions": summary}}, "sizes": [...], "condition_order", "seeds", "settings"}``, each
  summary as :func:`~sb_crossmodal_kd.ablation.summarize` makes it;
- ``scaling.md``: :func:`scaling_table`; ``scaling.png``: :func:`plot_scaling`.

Each size's ablation resumes as any ablation does, so the driver can be stopped and restarted
at any point; sizes run smallest first.
"""

import math
from pathlib import Path

from sb_crossmodal_kd.ablation import (
    DEMO_TRAINING,
    TREND_NOTE,
    condition_recipe,
    is_flat,
    last_quarter_gain,
    last_quarter_trend,
    paired_difference,
    run_ablation,
    save_wer_plot,
)
from sb_crossmodal_kd.io import atomic_write_json, atomic_write_text, exclusive_folder
from sb_crossmodal_kd.prep.settings import prep_settings

__all__ = ["SCALING_CONDITIONS", "SCALING_PAIRED", "parse_paired", "plot_scaling",
           "run_scaling", "scaling_epochs", "scaling_table"]

# The AM alone, the hierarchy and its no-LM control: the gain, and the LM's share of it.
SCALING_CONDITIONS = ("am_alone", "hierarchy", "hierarchy_no_lm")
SCALING_PAIRED = (150, 600, 2400)


def scaling_epochs(n, epochs, reference=None):
    """Epochs of a run on ``n`` paired utterances: ``epochs``, or with ``reference``, enough
    epochs for at least the optimiser steps of ``epochs`` epochs on ``reference`` utterances
    (a small train set would otherwise stop long before it converges).

    Example
    -------
    >>> [scaling_epochs(n, 18, reference=1200) for n in (150, 600, 1200, 2400)]
    [144, 36, 18, 18]
    >>> scaling_epochs(150, 18)
    18
    """
    if reference is None or n >= reference:
        return epochs
    return math.ceil(epochs * reference / n)


def parse_paired(text):
    """Train-set sizes from a comma-separated list, e.g. ``--paired 150,600,2400``.

    Example
    -------
    >>> parse_paired("600,150, 2400")
    (150, 600, 2400)
    >>> parse_paired("150,many")
    Traceback (most recent call last):
    ...
    ValueError: --paired takes positive integers separated by commas, e.g. 150,600,2400; got '150,many'
    """
    try:
        sizes = [int(part) for part in str(text).split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise ValueError("--paired takes positive integers separated by commas, e.g. "
                         f"150,600,2400; got {text!r}")
    return tuple(sorted(set(sizes)))


def _train_set(prepared_dir, n):
    """What ``n_train_utterances: n`` trains on, chosen as the recipe chooses it (the train
    manifest's utterances that the unit store holds, the first ``n`` of them)."""
    from speechbrain.dataio.dataset import DynamicItemDataset

    from sb_crossmodal_kd.kd_data import first_utterances, train_set_summary
    from sb_crossmodal_kd.units.store import UnitStore

    store = UnitStore(prepared_dir / "prep" / "units" / "train.units")
    train = DynamicItemDataset.from_csv(str(prepared_dir / "data" / "train.csv"))
    kept = train.filtered_sorted(key_test={"id": lambda utt_id: utt_id in store})
    return train_set_summary(first_utterances(kept, n))


def run_scaling(output_dir, paired=SCALING_PAIRED, conditions=SCALING_CONDITIONS, seeds=3,
                prep=None, training=None, steps_reference=None, device="cpu", jobs=1,
                progress=False):
    """Runs every condition at every train-set size (resumable); writes ``scaling.json``,
    ``.md`` and ``.png`` into ``output_dir``.

    Arguments
    ---------
    output_dir : str or Path
        ``data/`` and ``prep/`` (shared by all sizes), ``paired_<N>/`` (one ablation each).
    paired : sequence of int
        Train-set sizes (paired utterances); the largest at most the corpus's ``n_train``.
    conditions : sequence of str
        Conditions of :data:`~sb_crossmodal_kd.ablation.CONDITIONS`.
    seeds : int
        Paired seeds per condition and size.
    prep : dict, optional
        Data-chain settings (see :func:`~sb_crossmodal_kd.ablation.run_ablation`).
    training : dict, optional
        Recipe overrides of every run (default the demo's).
    steps_reference : int, optional
        Train-set size whose optimiser steps every smaller size trains for at least
        (:func:`scaling_epochs`); None: the same epochs at every size.
    device, jobs, progress
        As :func:`~sb_crossmodal_kd.ablation.run_ablation`.

    Returns
    -------
    dict
        The content of ``scaling.json``.
    """
    output_dir = Path(output_dir).resolve()
    paired = parse_paired(",".join(map(str, paired)))
    conditions = list(conditions)
    for name in conditions:
        condition_recipe(name)  # unknown names fail before hours of work
    settings = prep_settings(**(prep or {}))
    n_train = settings["corpus"]["n_train"]
    if paired[-1] > n_train:
        raise ValueError(f"paired sizes {list(paired)} exceed the corpus's {n_train} train "
                         "utterances: lower them or raise the prep setting corpus.n_train")
    training = dict(DEMO_TRAINING if training is None else training)
    with exclusive_folder(output_dir):  # two drivers would train the same runs
        sizes = {}
        for n in paired:
            epochs = scaling_epochs(n, training["number_of_epochs"], steps_reference)
            result = run_ablation(output_dir / f"paired_{n}", seeds=seeds, conditions=conditions,
                                  prep=prep, training={**training, "number_of_epochs": epochs,
                                                       "n_train_utterances": n},
                                  device=device, jobs=jobs, progress=progress,
                                  prepared_dir=output_dir)
            sizes[str(n)] = {**_train_set(output_dir, n), "epochs": epochs,
                             "conditions": result["conditions"]}
        result = {
            "format": "sbkd-scaling-1",
            "paired": sizes,
            "sizes": list(paired),
            "condition_order": conditions,
            "seeds": result["seeds"],
            "settings": {"prep": result["settings"]["prep"], "training": training,
                         "steps_reference": steps_reference, "device": device},
            "lm_valid_ppl": result.get("lm_valid_ppl"),
        }
        atomic_write_json(output_dir / "scaling.json", result)
        atomic_write_text(output_dir / "scaling.md", scaling_table(result))
        plot_scaling(result, output_dir / "scaling.png")
        return result


def _cell(mean, std):
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def scaling_table(result):
    """Test WER by train-set size and condition, the paired gains, and where the gain of the
    hierarchy over the AM alone is largest, as Markdown.

    Example
    -------
    >>> from sb_crossmodal_kd.ablation import summarize
    >>> def size(n, hours, am, hi):
    ...     records = {("am_alone", 1): {"wer": am, "cer": 1.0, "train_s": 1, "params": 5},
    ...                ("hierarchy", 1): {"wer": hi, "cer": 1.0, "train_s": 1, "params": 5}}
    ...     return {"utterances": n, "hours": hours, "epochs": 18,
    ...             "conditions": summarize(records, ["am_alone", "hierarchy"], [1])}
    >>> result = {"sizes": [150, 600], "condition_order": ["am_alone", "hierarchy"],
    ...           "seeds": [1], "paired": {"150": size(150, 0.12, 60.0, 40.0),
    ...                                    "600": size(600, 0.5, 30.0, 25.0)}}
    >>> print(scaling_table(result).splitlines()[2])
    | 150 | 0.12 | 18 | 60.00 | 40.00 | -20.00 | - | - |
    """
    conditions = result["condition_order"]
    deltas = [(name, "am_alone") for name in conditions
              if name != "am_alone" and "am_alone" in conditions]
    if {"hierarchy", "hierarchy_no_lm"} <= set(conditions):
        deltas.append(("hierarchy", "hierarchy_no_lm"))
    header = (["paired utterances", "hours", "epochs"] + [f"{name} WER %" for name in conditions]
              + [f"Δ {a} − {b}" for a, b in deltas]
              + ["valid gain, last ¼ (worst run)", "valid trend, last ¼ (worst run)"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    gains = {}
    for n in result["sizes"]:
        size = result["paired"][str(n)]
        summary = size["conditions"]
        cells = [str(n), f"{size['hours']:.2f}", str(size["epochs"])]
        cells += [_cell(summary[name]["wer_mean"], summary[name]["wer_std"]) for name in conditions]
        for a, b in deltas:
            mean, std = paired_difference(summary, a, b)
            gains[(a, b, n)] = mean
            cells.append(_cell(mean, std))
        curves = [run.get("valid_wer_curve", [])
                  for entry in summary.values() for run in entry["per_seed"].values()]
        for measure in (last_quarter_gain, last_quarter_trend):
            worst = [value for value in map(measure, curves) if value is not None]
            cells.append(f"{100 * max(worst):.1f} %" if worst else "-")
        lines.append("| " + " | ".join(cells) + " |")
    seeds = result["seeds"]
    lines += ["", f"Test WER %, mean ± std over {len(seeds)} paired seed"
              f"{'s' if len(seeds) > 1 else ''} ({', '.join(map(str, seeds))}); Δ: the paired "
              "difference, seed by seed (negative: the first is better). Every size trains on "
              "the first N train utterances of one manifest, with the same valid and test "
              "sets and the same teachers."]
    if ("hierarchy", "am_alone", result["sizes"][0]) in gains:
        best = min(result["sizes"], key=lambda n: gains[("hierarchy", "am_alone", n)])
        hours = result["paired"][str(best)]["hours"]
        lines.append(f"The hierarchy's gain over the AM alone is largest at {best} paired "
                     f"utterances ({hours:.2f} h): "
                     f"{gains[('hierarchy', 'am_alone', best)]:+.2f} WER points.")
    runs = [(n, name, seed, run.get("valid_wer_curve", []))
            for n in result["sizes"]
            for name, entry in result["paired"][str(n)]["conditions"].items()
            for seed, run in entry["per_seed"].items()]
    unflat = [f"{name} at {n} (seed {seed})" for n, name, seed, curve in runs
              if is_flat(curve) is False]
    lines.append(f"Not converged (valid gain over the last ¼ of the epochs ≥ 3 %): "
                 f"{', '.join(unflat)}." if unflat else
                 f"All {len(runs)} runs converged (valid gain over the last ¼ of the epochs "
                 "< 3 %).")
    lines.append(TREND_NOTE[0].upper() + TREND_NOTE[1:])
    return "\n".join(lines) + "\n"


def plot_scaling(result, path):
    """Test WER against paired hours (log scale), one line per condition, seed std as error
    bars; written atomically to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [result["paired"][str(n)] for n in result["sizes"]]
    hours = [size["hours"] for size in sizes]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in result["condition_order"]:
        entries = [size["conditions"][name] for size in sizes]
        ax.errorbar(hours, [e["wer_mean"] for e in entries],
                    yerr=[e["wer_std"] or 0.0 for e in entries], marker="o", capsize=3,
                    label=name.replace("_", " "))
    ax.set_xscale("log")
    ax.set_xticks(hours)
    ax.set_xticklabels([f"{h:.2g} h\n({n})" for h, n in zip(hours, result["sizes"], strict=True)])
    ax.minorticks_off()
    ax.set_xlabel("paired train data (utterances)")
    save_wer_plot(fig, ax, "Distillation against the amount of paired data", path)
