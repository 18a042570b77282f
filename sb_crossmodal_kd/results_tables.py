"""README's results of the study and the scaling study, from the files under ``results/``.

    python -m sb_crossmodal_kd.results_tables results/ [--readme README.md]

prints the Markdown README shows (or, with ``--readme``, writes it between README's
results-tables markers), from ``results/long/ablation.json`` (``sbkd demo
--long``), ``results/study/ablation.json`` (``sbkd demo --study``), beside each some of
its conditions trained longer (``results/long_80_epochs/``, ``results/study_120_epochs/``:
:func:`longer_budgets`), and
``results/scaling/scaling.json`` (``sbkd demo --scaling``) as
:mod:`sb_crossmodal_kd.results_store` stored them, and writes the scaling plot
``results/scaling/scaling.png``. A part not stored yet is said to be so. For the long
demo and the study: the
condition table (paired differences to the AM alone), the paper's ordering tested pair by
pair, the LM's own share (hierarchy against the same heads on hard labels), and each run's
valid-curve flatness; for the scaling study: test WER by paired-data size and where the gain
is largest.
"""

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from sb_crossmodal_kd.ablation import (
    FLAT_GAIN,
    TREND_NOTE,
    last_quarter_gain,
    last_quarter_trend,
    markdown_table,
    paired_difference,
)
from sb_crossmodal_kd.io import atomic_write_text
from sb_crossmodal_kd.scaling import plot_scaling, scaling_table
from sb_crossmodal_kd.shallow_fusion import fusion_claims, fusion_markdown

__all__ = ["CLAIMED_ORDER", "README_BEGIN", "README_END", "budget_section", "budget_table",
           "claim_lines", "decoding_section", "flatness_cell", "flatness_table", "longer_budgets",
           "provenance_line", "quarter_means", "readme_block", "readme_results",
           "scaling_section", "shared_seeds", "study_section", "valid_lead_by_quarter",
           "write_readme"]

# The paper's claim, best first: each condition's WER below the next one's.
CLAIMED_ORDER = ("hierarchy", "aux_subword", "label_interpolation", "am_alone")


def _pm(mean, std):
    return f"{mean:+.2f}" + (f" ± {std:.2f}" if std is not None else "")


def _seeds_below(summary, condition, reference):
    runs, references = summary[condition]["per_seed"], summary[reference]["per_seed"]
    seeds = sorted(set(runs) & set(references))
    return sum(runs[s]["wer"] < references[s]["wer"] for s in seeds), len(seeds)


def claim_lines(summary):
    """The paper's ordering tested pair by pair (paired differences, seeds that agree) and
    the LM's own share, as Markdown bullets; conditions missing from ``summary`` are skipped.

    Example
    -------
    >>> summary = {"hierarchy": {"per_seed": {"1": {"wer": 30.0}, "2": {"wer": 32.0}}},
    ...            "hierarchy_no_lm": {"per_seed": {"1": {"wer": 32.0}, "2": {"wer": 33.0}}},
    ...            "am_alone": {"per_seed": {"1": {"wer": 40.0}, "2": {"wer": 42.0}}}}
    >>> print("\\n".join(claim_lines(summary)))
    - hierarchy < am_alone: Δ -10.00 ± 0.00 (2 of 2 seeds): holds
    - the LM's own share, hierarchy − hierarchy_no_lm: Δ -1.50 ± 0.71 (2 of 2 seeds below), 15 % of the hierarchy's -10.00 over the AM alone
    """
    present = [name for name in CLAIMED_ORDER if name in summary]
    lines = []
    for better, worse in zip(present, present[1:], strict=False):
        mean, std = paired_difference(summary, better, worse)
        below, seeds = _seeds_below(summary, better, worse)
        verdict = "holds" if mean < 0 and below == seeds else (
            "holds on the mean, not in every seed" if mean < 0 else "does not hold")
        lines.append(f"- {better} < {worse}: Δ {_pm(mean, std)} ({below} of {seeds} seeds): "
                     f"{verdict}")
    if {"hierarchy", "hierarchy_no_lm"} <= set(summary):
        mean, std = paired_difference(summary, "hierarchy", "hierarchy_no_lm")
        below, seeds = _seeds_below(summary, "hierarchy", "hierarchy_no_lm")
        line = (f"- the LM's own share, hierarchy − hierarchy_no_lm: Δ {_pm(mean, std)} "
                f"({below} of {seeds} seeds below)")
        if "am_alone" in summary:
            gain, _ = paired_difference(summary, "hierarchy", "am_alone")
            if gain:
                line += (f", {100 * mean / gain:.0f} % of the hierarchy's {gain:+.2f} over the "
                         "AM alone")
        lines.append(line)
    return lines


def flatness_cell(curve):
    """A valid WER curve's gain over the last quarter of its epochs, ✗ where it is not flat,
    and in brackets its trend there (where the quarter has two epochs or more); ``-`` for a
    curve too short to tell.

    Example
    -------
    >>> flatness_cell([90, 50, 45, 40, 38, 37.5, 36.0, 35.6]), flatness_cell([50.0])
    ('5.1 % ✗ (1.1 %)', '-')
    """
    gain, trend = last_quarter_gain(curve), last_quarter_trend(curve)
    if gain is None:
        return "-"
    return (f"{100 * gain:.1f} %" + (" ✗" if gain >= FLAT_GAIN else "")
            + ("" if trend is None else f" ({100 * trend:.1f} %)"))


def flatness_table(summary):
    """Each run's relative valid gain over the last quarter of its epochs, ✗ where it is not
    flat (at least :data:`~sb_crossmodal_kd.ablation.FLAT_GAIN`), and in brackets the trend
    there (:func:`~sb_crossmodal_kd.ablation.last_quarter_trend`, where the quarter has two
    epochs or more), as Markdown.

    Example
    -------
    >>> summary = {"am_alone": {"per_seed": {
    ...     "1": {"epochs": 4, "valid_wer_curve": [90.0, 50.0, 45.0, 44.9]},
    ...     "2": {"epochs": 8, "valid_wer_curve": [90, 50, 45, 40, 38, 37.5, 36.0, 35.6]}}}}
    >>> print(flatness_table(summary))
    | condition | seed 1 | seed 2 |
    |---|---|---|
    | am_alone | 0.2 % | 5.1 % ✗ (1.1 %) |
    <BLANKLINE>
    1 of 2 runs not flat (valid WER still improving by 3 % or more over the last ¼ of the epochs). In brackets: the valid trend, the fall of the mean valid WER from the first half of the last ¼ of the epochs to its second half, which noise between epochs does not push up as it does the gain (a best epoch against one epoch).
    """
    seeds = sorted({seed for entry in summary.values() for seed in entry["per_seed"]})
    lines = ["| condition | " + " | ".join(f"seed {seed}" for seed in seeds) + " |",
             "|---|" + "---|" * len(seeds)]
    unflat = total = 0
    for name, entry in summary.items():
        cells = []
        for seed in seeds:
            run = entry["per_seed"].get(seed)
            curve = [] if run is None else run.get("valid_wer_curve", [])
            gain = last_quarter_gain(curve)
            total += gain is not None
            unflat += gain is not None and gain >= FLAT_GAIN
            cells.append(flatness_cell(curve))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    limit = f"{100 * FLAT_GAIN:g} %"
    lines += ["", (f"{unflat} of {total} runs not flat (valid WER still improving by {limit} or "
              "more over the last ¼ of the epochs)." if unflat else
              f"All {total} runs flat (valid WER improving by less than {limit} over the last ¼ "
              "of the epochs).") + " In brackets: " + TREND_NOTE]
    return "\n".join(lines) + "\n"


def shared_seeds(results):
    """The seeds that every one of ``results`` (ablation results) ran, sorted.

    Example
    -------
    >>> def result(*seeds):
    ...     return {"conditions": {"am_alone": {"per_seed": {seed: {} for seed in seeds}}}}
    >>> shared_seeds([result("1986", "1987", "1988"), result("1987", "1986")])
    ['1986', '1987']
    """
    return sorted(set.intersection(*(
        {seed for entry in result["conditions"].values() for seed in entry["per_seed"]}
        for result in results)))


def budget_table(results):
    """The same conditions trained for different numbers of epochs, seed by seed: test WER,
    the best valid WER and its epoch, and the valid gain and trend over the last quarter
    (:func:`flatness_cell`); then the
    hierarchy's differences to the AM alone and to its no-LM control at each budget.

    Arguments
    ---------
    results : list of dict
        Ablation results (``ablation.json``) of one corpus and set of teachers, fewest
        epochs first; the conditions and seeds they share are shown.

    Example
    -------
    >>> def run(wer, curve):
    ...     return {"wer": wer, "valid_wer_curve": curve}
    >>> def result(epochs, wers, curve):
    ...     return {"settings": {"training": {"number_of_epochs": epochs}},
    ...             "conditions": {name: {"per_seed": {"1": run(wer, curve)}}
    ...                            for name, wer in wers.items()}}
    >>> names = ("am_alone", "hierarchy", "hierarchy_no_lm")
    >>> print(budget_table([result(4, dict(zip(names, (30.0, 25.0, 27.0))), [90, 50, 45, 40]),
    ...                     result(8, dict(zip(names, (20.0, 18.0, 19.0))),
    ...                            [90, 50, 45, 40, 38, 37, 37.5, 37.2])]))
    | condition | epochs | seed | test WER % | best valid WER % (epoch) | valid gain, last ¼ (trend) |
    |---|---|---|---|---|---|
    | am_alone | 4 | 1 | 30.00 | 40.00 (4) | 11.1 % ✗ |
    | am_alone | 8 | 1 | 20.00 | 37.00 (6) | -0.5 % (0.8 %) |
    | hierarchy | 4 | 1 | 25.00 | 40.00 (4) | 11.1 % ✗ |
    | hierarchy | 8 | 1 | 18.00 | 37.00 (6) | -0.5 % (0.8 %) |
    | hierarchy_no_lm | 4 | 1 | 27.00 | 40.00 (4) | 11.1 % ✗ |
    | hierarchy_no_lm | 8 | 1 | 19.00 | 37.00 (6) | -0.5 % (0.8 %) |
    <BLANKLINE>
    - 4 epochs: hierarchy − am_alone -5.00, hierarchy − hierarchy_no_lm (the LM's own share) -2.00
    - 8 epochs: hierarchy − am_alone -2.00, hierarchy − hierarchy_no_lm (the LM's own share) -1.00
    <BLANKLINE>
    """
    seeds = shared_seeds(results)
    # The conditions trained at every budget (a longer budget often retrains a few)
    names = [name for name in results[0]["conditions"]
             if all(name in result["conditions"] for result in results)]
    lines = ["| condition | epochs | seed | test WER % | best valid WER % (epoch) | "
             "valid gain, last ¼ (trend) |", "|---|---|---|---|---|---|"]
    for name in names:
        for result in results:
            epochs = result["settings"]["training"]["number_of_epochs"]
            for seed in seeds:
                run = result["conditions"].get(name, {}).get("per_seed", {}).get(seed)
                if run is None:
                    continue
                curve = run.get("valid_wer_curve", [])
                best = min(range(len(curve)), key=curve.__getitem__) if curve else None
                lines.append(
                    f"| {name} | {epochs} | {seed} | {run['wer']:.2f} | "
                    + ("-" if best is None else f"{curve[best]:.2f} ({best + 1})") + " | "
                    + flatness_cell(curve) + " |")
    lines.append("")
    for result in results:
        conditions = result["conditions"]
        if "hierarchy" not in conditions:
            continue
        pairs = [(reference, label) for reference, label in (
            ("am_alone", "hierarchy − am_alone"),
            ("hierarchy_no_lm", "hierarchy − hierarchy_no_lm (the LM's own share)"))
            if reference in conditions]
        summary = {name: {"per_seed": {seed: conditions[name]["per_seed"][seed]
                                       for seed in seeds}}
                   for name in ("hierarchy", *(reference for reference, _ in pairs))}
        differences = [f"{label} {_pm(*paired_difference(summary, 'hierarchy', reference))}"
                       for reference, label in pairs]
        lines.append(f"- {result['settings']['training']['number_of_epochs']} epochs: "
                     + ", ".join(differences))
    return "\n".join(lines) + "\n"


def quarter_means(curve):
    """The mean of each quarter of a valid WER curve's epochs (the last takes the remainder);
    None for a curve of fewer than 4 epochs.

    Example
    -------
    >>> quarter_means([80, 60, 40, 30, 20, 18, 16, 15, 14])
    [70.0, 35.0, 19.0, 15.0]
    """
    size = len(curve) // 4
    if not size:
        return None
    parts = [curve[k * size:(k + 1) * size] for k in range(3)] + [curve[3 * size:]]
    return [round(sum(part) / len(part), 3) for part in parts]


def valid_lead_by_quarter(results):
    """How the hierarchy's valid WER lead changes along training, at each budget: the
    hierarchy's mean valid WER over each quarter of the epochs minus the AM alone's and its
    no-LM control's, seed by seed, mean ± std over the seeds every budget ran. A lead that shrinks
    towards the end is one the reference catches up with by training longer.

    Example
    -------
    >>> def result(epochs, curves):
    ...     return {"settings": {"training": {"number_of_epochs": epochs}},
    ...             "conditions": {name: {"per_seed": {"1": {"valid_wer_curve": curve}}}
    ...                            for name, curve in curves.items()}}
    >>> print(valid_lead_by_quarter([result(4, {"hierarchy": [50, 40, 30, 25],
    ...                                          "am_alone": [60, 45, 33, 26]})]))
    | epochs | hierarchy − | 1st ¼ | 2nd ¼ | 3rd ¼ | last ¼ |
    |---|---|---|---|---|---|
    | 4 | am_alone | -10.00 | -5.00 | -3.00 | -1.00 |
    <BLANKLINE>
    """
    seeds = shared_seeds(results)
    lines = ["| epochs | hierarchy − | 1st ¼ | 2nd ¼ | 3rd ¼ | last ¼ |", "|---|---|---|---|---|---|"]
    for result in results:
        conditions = result["conditions"]
        if "hierarchy" not in conditions:
            continue
        for reference in ("am_alone", "hierarchy_no_lm"):
            if reference not in conditions:
                continue
            means = {name: {seed: quarter_means(conditions[name]["per_seed"][seed].get(
                                "valid_wer_curve", [])) for seed in seeds}
                     for name in ("hierarchy", reference)}
            if any(value is None for runs in means.values() for value in runs.values()):
                continue
            cells = []
            for quarter in range(4):
                summary = {name: {"per_seed": {seed: {"valid": values[quarter]}
                                               for seed, values in runs.items()}}
                           for name, runs in means.items()}
                cells.append(_pm(*paired_difference(summary, "hierarchy", reference,
                                                    metric="valid")))
            lines.append(f"| {result['settings']['training']['number_of_epochs']} | "
                         f"{reference} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def provenance_line(result):
    """Where a stored result was made: the commit and command of its storing, the commits
    its runs recorded, and the device.

    Example
    -------
    >>> provenance_line({"provenance": {"commit": "abc1234", "command": "sbkd demo --study"},
    ...                  "ran": {"device": "cpu", "cpus": 2, "gpu": None},
    ...                  "conditions": {"am_alone": {"per_seed": {"1": {"commit": "abc1234"},
    ...                                                           "2": {"commit": "abc1234"}}}}})
    'Run by `sbkd demo --study` at commit abc1234 (runs: abc1234 × 2) on cpu, 2 CPUs.'
    """
    provenance, ran = result.get("provenance", {}), result.get("ran", {})
    summaries = ([size["conditions"] for size in result["paired"].values()]
                 if "paired" in result else [result["conditions"]])
    commits = Counter(run.get("commit") or "unrecorded" for summary in summaries
                      for entry in summary.values() for run in entry["per_seed"].values())
    device = ran.get("gpu") or ran.get("device") or result.get("settings", {}).get("device")
    cpus = f", {ran['cpus']} CPUs" if ran.get("cpus") else ""
    runs = ", ".join(f"{commit[:12]} × {count}" for commit, count in commits.most_common())
    return (f"Run by `{provenance.get('command', '?')}` at commit "
            f"{provenance.get('commit', '?')[:12]} (runs: {runs}) on {device}{cpus}.")


def study_section(result):
    """The Markdown of an ablation result (the long demo's, the study's): condition
    table, claim, flatness, provenance."""
    summary = {name: result["conditions"][name] for name in result["condition_order"]}
    partial = result.get("partial")
    status = [] if not partial else [
        f"**Partial:** {partial['finished_runs']} of {partial['planned_runs']} runs finished; "
        f"the tables hold the seeds every condition has finished ({len(result['seeds'])} of "
        f"{len(partial['planned_seeds'])}). Re-running the study's command resumes it.", ""]
    return "\n".join([*status,
        markdown_table(summary, result["seeds"]),
        "The paper's ordering, pair by pair (paired differences of test WER, seed by seed):",
        "", *claim_lines(summary), "",
        "Valid-curve flatness of every run (relative valid gain over the last ¼ of the epochs):",
        "", flatness_table(summary), provenance_line(result), ""])


def decoding_section(result):
    """The study's decoding rows: greedy and LM decoding of the AM alone and the hierarchy,
    and distillation against shallow fusion, paired by seed."""
    ran = result.get("ran", {})
    where = ran.get("gpu") or ran.get("device") or result["settings"].get("device", "?")
    commits = sorted({run.get("commit") or ran.get("commit") or "?" for run in result["runs"]})
    return "\n".join([
        fusion_markdown(result),
        "Distillation against the LM at decoding time (paired by seed):", "",
        *fusion_claims(result), "",
        f"Decoded at commit {', '.join(c[:12] for c in commits)} on {where}"
        + (f", {ran['cpus']} CPUs" if ran.get("cpus") else "") + ".", ""])


def scaling_section(result, plot_path, plot_link):
    """The scaling study's Markdown (table, plot link, provenance); writes the plot."""
    plot_scaling(result, plot_path)
    return "\n".join([scaling_table(result),
                      f"![test WER against paired hours]({plot_link})", "",
                      provenance_line(result), ""])


def longer_budgets(results_dir, part):
    """The stored results of ``part``'s conditions trained longer, fewest epochs first: the
    ``ablation.json`` of each ``<part>_<epochs>_epochs/`` folder of ``results_dir``.

    Example
    -------
    >>> import tempfile, pathlib
    >>> results = pathlib.Path(tempfile.mkdtemp())
    >>> for name in ("study_120_epochs", "study_80_epochs", "study_x_epochs", "long_80_epochs"):
    ...     (results / name).mkdir()
    ...     _ = (results / name / "ablation.json").write_text("{}")
    >>> [path.parent.name for path in longer_budgets(results, "study")]
    ['study_80_epochs', 'study_120_epochs']
    """
    found = []
    for path in Path(results_dir).glob(f"{part}_*_epochs/ablation.json"):
        epochs = path.parent.name[len(part) + 1:-len("_epochs")]
        if epochs.isdigit():
            found.append((int(epochs), path))
    return [path for _, path in sorted(found)]


def budget_section(results_dir, part, title, heading):
    """The Markdown lines of :func:`budget_table` for ``part`` (``long`` or ``study``) and
    its :func:`longer_budgets`; none when either is not stored."""
    base = Path(results_dir) / part / "ablation.json"
    longer = longer_budgets(results_dir, part)
    if not base.is_file() or not longer:
        return []
    results = [json.loads(path.read_text()) for path in (base, *longer)]
    epochs = [str(result["settings"]["training"]["number_of_epochs"]) for result in results]
    return [f"{heading} {title} conditions at {', '.join(epochs[:-1])} and {epochs[-1]} epochs",
            "", budget_table(results),
            "Valid WER, the hierarchy minus each reference, mean over each quarter of the "
            "epochs (paired by seed, mean ± std over seeds; negative: the hierarchy is ahead):",
            "", valid_lead_by_quarter(results),
            *(provenance_line(result) for result in results[1:]), ""]


def readme_results(results_dir, heading="###"):
    """The Markdown of every part from ``results_dir`` (``long/``, ``study/``,
    ``scaling/``), each part under a ``heading`` of its own."""
    results_dir = Path(results_dir)
    parts = [f"{heading} The demo trained longer (`sbkd demo --long`)", ""]
    long = results_dir / "long" / "ablation.json"
    parts += ([study_section(json.loads(long.read_text()))] if long.is_file()
              else [f"Not run yet ({long} absent).", ""])
    parts += budget_section(results_dir, "long", "The long demo's", heading)
    study = results_dir / "study" / "ablation.json"
    if study.is_file():
        parts += [f"{heading} The study (`sbkd demo --study`)", "",
                  study_section(json.loads(study.read_text()))]
        decoding = study.parent / "decoding.json"
        if decoding.is_file():
            parts += [f"{heading} Distillation or the LM at decoding time (`sbkd demo --study`)",
                      "", decoding_section(json.loads(decoding.read_text()))]
        parts += budget_section(results_dir, "study", "The study's", heading)
    else:
        parts += [f"{heading} The study (`sbkd demo --study`)", "",
                  f"Not run yet ({study} absent).", ""]
    scaling = results_dir / "scaling" / "scaling.json"
    if scaling.is_file():
        plot = scaling.parent / "scaling.png"
        parts += [f"{heading} Scarce paired data (`sbkd demo --scaling`)", "",
                  scaling_section(json.loads(scaling.read_text()), plot, plot.as_posix())]
    else:
        parts += [f"{heading} Scarce paired data (`sbkd demo --scaling`)", "",
                  f"Not run yet ({scaling} absent).", ""]
    return "\n".join(parts)


# README holds the tables between these two lines, under its level-2 Results section.
README_BEGIN = "<!-- results-tables:begin -->"
README_END = "<!-- results-tables:end -->"
README_HEADING = "####"


def readme_block(readme):
    """The text between README's results-tables markers (without them).

    Example
    -------
    >>> import tempfile, pathlib
    >>> readme = pathlib.Path(tempfile.mkdtemp()) / "README.md"
    >>> _ = readme.write_text(f"# Title\\n{README_BEGIN}\\nold\\n{README_END}\\nrest\\n")
    >>> readme_block(readme)
    'old\\n'
    """
    text = Path(readme).read_text()
    start, end = _block_span(text, readme)
    return text[start:end]


def _block_span(text, readme):
    """Where README's block starts (after the begin line) and ends (at the end line)."""
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise ValueError(f"{readme} has no '{README_BEGIN}' line followed by a "
                         f"'{README_END}' line: put the two where the tables go")
    return begin + len(README_BEGIN) + 1, end


def write_readme(readme, results_dir):
    """Replaces README's results-tables block by the tables of ``results_dir``; the rest of
    README is left as it was. Written atomically."""
    text = Path(readme).read_text()
    start, end = _block_span(text, readme)
    new = readme_results(results_dir, heading=README_HEADING)
    atomic_write_text(readme, text[:start] + new + text[end:])


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", default="results",
                        help="the folder of long/, study/ and scaling/ (default results)")
    parser.add_argument("--readme", help="write the tables into this README, between its "
                        f"'{README_BEGIN}' and '{README_END}' lines, instead of printing them")
    args = parser.parse_args(argv)
    if not Path(args.results).is_dir():
        raise FileNotFoundError(f"{args.results} is not a folder: give the folder holding "
                                "long/, study/ and scaling/ (e.g. results/)")
    if args.readme:
        write_readme(args.readme, args.results)
    else:
        print(readme_results(args.results), end="")


if __name__ == "__main__":
    from sb_crossmodal_kd.cli import run_reporting_errors

    sys.exit(run_reporting_errors(main, sys.argv[1:], "results_tables"))
