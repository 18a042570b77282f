"""The main job on the embedded corpus: the distillation ablation, as ``sbkd demo`` runs it.

Four presets, each resumable in its own output folder:

- the demo (default): the conditions that carry the claim (:data:`DEMO_CONDITIONS`: the AM
  alone, label interpolation, one subword head, the hierarchy and the same heads on hard
  labels with no LM) on the dense encoder with one seed, sized for 15 minutes on 2 CPU
  cores (:data:`~sb_crossmodal_kd.prep.settings.PREP_DEFAULTS`,
  :data:`~sb_crossmodal_kd.ablation.DEMO_TRAINING`), by
  :func:`~sb_crossmodal_kd.ablation.run_ablation`;
- the demo trained longer (``preset="long"``): the demo's conditions, corpus and
  teachers, each run trained twice as long (:data:`LONG_TRAINING`): the reference the
  15-minute demo is read against, about half an hour per seed on 2 CPU cores;
- the study (``preset="study"``): :data:`STUDY_CONDITIONS` (every dense condition, the AM
  alone and the hierarchy on the MoE encoder) with 3 paired seeds, then the AM alone and the
  hierarchy decoded greedily and with a word n-gram LM
  (:func:`~sb_crossmodal_kd.shallow_fusion.run_shallow_fusion`, ``decoding.json``),
  each run trained as long as the long demo's (not to a flat valid curve: see
  :func:`convergence_note`), with the corpus's full LM text (:data:`STUDY_TRAINING`,
  :data:`STUDY_PREP`);
- the scaling study (``preset="scaling"``): :data:`~sb_crossmodal_kd.scaling.SCALING_CONDITIONS`
  at :data:`~sb_crossmodal_kd.scaling.SCALING_PAIRED` paired train utterances, 3 seeds, the
  study's training and LM text on a corpus with :data:`SCALING_N_TRAIN` train utterances
  (:func:`~sb_crossmodal_kd.scaling.run_scaling`).

Each records in its result file where it ran (``ran``: commit, command, device).
"""

import os
import time
from dataclasses import fields
from pathlib import Path

from sb_crossmodal_kd.ablation import (
    DEMO_TRAINING,
    DENSE_CONDITIONS,
    FLAT_GAIN,
    MOE_SUFFIX,
    is_flat,
    run_ablation,
)
from sb_crossmodal_kd.data.corpus import CorpusSettings
from sb_crossmodal_kd.io import atomic_write_json
from sb_crossmodal_kd.revision import run_context
from sb_crossmodal_kd.scaling import SCALING_CONDITIONS, SCALING_PAIRED, run_scaling
from sb_crossmodal_kd.shallow_fusion import FUSION_CONDITIONS, run_shallow_fusion

__all__ = ["DEMO_CONDITIONS", "LONG_PREP", "LONG_TRAINING", "PRESETS", "SCALING_N_TRAIN",
           "SCALING_PREP", "STUDY_CONDITIONS", "STUDY_PREP", "STUDY_SEEDS", "STUDY_TRAINING",
           "convergence_note", "default_output", "run_demo"]

PRESETS = ("demo", "long", "study", "scaling")

# hierarchy vs hierarchy_no_lm is the LM's own share; hierarchy_no_lm vs am_alone what the
# alignment alone gives. The level ablations and MoE variants: `sbkd ablation --conditions`.
DEMO_CONDITIONS = ("am_alone", "label_interpolation", "aux_subword", "hierarchy",
                   "hierarchy_no_lm")

# Every dense condition, and on the MoE encoder the AM alone and the hierarchy: the MoE
# question is whether distillation still pays with sparse layers, and the other six MoE
# variants would add 18 runs (about 2 h on 2 CPU cores) to answer nothing more. They stay
# available: ``sbkd ablation --conditions``.
STUDY_CONDITIONS = DENSE_CONDITIONS + tuple(f"{name}{MOE_SUFFIX}"
                                            for name in ("am_alone", "hierarchy"))
STUDY_SEEDS = 3
# 40 epochs instead of the demo's 20 (the schedule decays to zero over the 40): the AM alone
# goes from 13.6 % test WER to 9.2 (results/long, 3 seeds), and no run is flat yet by the 3 %
# criterion (4 to 25 % over the last quarter). A fixed budget, not convergence: trained 120
# epochs (results/study_120_epochs), the AM alone gets to 5.5 and catches up with most of
# the hierarchy's lead, and no run is flat either.
LONG_TRAINING = {**DEMO_TRAINING, "number_of_epochs": 40}
LONG_PREP = {}  # the demo's corpus, LM text and teachers
# The study trains as long (the stored results/study ran at 18 epochs, when that was thought
# enough; its runs record it).
STUDY_TRAINING = LONG_TRAINING
_CORPUS_DEFAULTS = {field.name: field.default for field in fields(CorpusSettings)}
# The demo's corpus with the LM text at SynthCommands' own size (the demo cuts it to 5,000
# sentences to fit its 15 minutes).
STUDY_PREP = {"corpus": {"n_text": _CORPUS_DEFAULTS["n_text"],
                         "n_text_valid": _CORPUS_DEFAULTS["n_text_valid"]}}
# The scaling study's largest size; its smaller ones are the first N of the same train list.
SCALING_N_TRAIN = max(SCALING_PAIRED)
SCALING_PREP = {"corpus": {**STUDY_PREP["corpus"], "n_train": SCALING_N_TRAIN}}
# Every scaling size trains for at least the optimiser steps of the study's 40 epochs on the
# demo's 1,200 utterances: 150 utterances for 40 epochs would stop before converging.
_STEPS_REFERENCE = 1200


def default_output(preset):
    """The output folder a preset uses unless told another: one per preset, so they never
    share (and refuse) a folder.

    Example
    -------
    >>> [default_output(preset) for preset in PRESETS]
    ['sbkd_demo', 'sbkd_long', 'sbkd_study', 'sbkd_scaling']
    """
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    return f"sbkd_{preset}"


def convergence_note(result):
    """One line on how many runs of an ablation result are not flat yet, and what trains them
    longer; None when every run is flat.

    Example
    -------
    >>> result = {"conditions": {"am_alone": {"per_seed": {
    ...     "1986": {"valid_wer_curve": [90.0, 60.0, 50.0, 40.0]}}}}}
    >>> print(convergence_note(result))
    Not converged: 1 of 1 runs still improve valid WER by 3 % or more over the last quarter of their epochs; `sbkd demo --long` trains the same conditions 40 epochs.
    """
    flat = [is_flat(run.get("valid_wer_curve", [])) for entry in result["conditions"].values()
            for run in entry["per_seed"].values()]
    falling = sum(value is False for value in flat)
    if not falling:
        return None
    return (f"Not converged: {falling} of {len(flat)} runs still improve valid WER by "
            f"{100 * FLAT_GAIN:g} % or more over the last quarter of their epochs; `sbkd demo "
            f"--long` trains the same conditions {LONG_TRAINING['number_of_epochs']} epochs.")


def run_demo(output_dir, preset="demo", seeds=None, jobs=None, device="cpu", progress=True,
             paired=None, command=None):
    """Runs the demo, the study or the scaling study into ``output_dir``; resumable.

    Arguments
    ---------
    output_dir : str or Path
        The preset's folder; one made with other settings is refused before any work.
    preset : str
        One of :data:`PRESETS`.
    seeds : int, optional
        Paired seeds per condition (default 1 for the demo and the long demo,
        :data:`STUDY_SEEDS` otherwise).
    jobs : int, optional
        Runs side by side (default one per core).
    device : str
        ``cpu`` or ``cuda:0``.
    progress : bool
        Progress bars of the data chain.
    paired : sequence of int, optional
        The scaling study's train-set sizes (default
        :data:`~sb_crossmodal_kd.scaling.SCALING_PAIRED`).
    command : str, optional
        The command line, recorded with the commit in the result's ``ran``.

    Returns
    -------
    dict
        The content of ``ablation.json`` (``scaling.json`` for the scaling study), with
        ``wall_s``: this call's wall time (of the remainder only, when it resumed a folder).
    """
    default_output(preset)  # an unknown preset fails before any work
    if paired is not None and preset != "scaling":
        raise ValueError("paired sizes are the scaling study's: use them with preset scaling")
    start = time.time()
    jobs = jobs or os.cpu_count() or 1
    if preset == "scaling":
        result = run_scaling(output_dir, paired=paired or SCALING_PAIRED,
                             conditions=SCALING_CONDITIONS, seeds=seeds or STUDY_SEEDS,
                             prep=SCALING_PREP, training=STUDY_TRAINING,
                             steps_reference=_STEPS_REFERENCE, device=device, jobs=jobs,
                             progress=progress)
        name = "scaling.json"
    elif preset == "long":
        result = run_ablation(output_dir, seeds=seeds or 1, conditions=DEMO_CONDITIONS,
                              prep=LONG_PREP, training=LONG_TRAINING, device=device,
                              jobs=jobs, progress=progress)
        name = "ablation.json"
    elif preset == "study":
        result = run_ablation(output_dir, seeds=seeds or STUDY_SEEDS,
                              conditions=STUDY_CONDITIONS, prep=STUDY_PREP,
                              training=STUDY_TRAINING, device=device, jobs=jobs,
                              progress=progress)
        # Against the LM at decoding time: the AM alone and the hierarchy, greedy and with
        # an n-gram LM trained on the same text (decoding.json).
        decoded = [name for name in FUSION_CONDITIONS if name in STUDY_CONDITIONS]
        if decoded:
            fusion = run_shallow_fusion(output_dir, result["seeds"], decoded, device=device,
                                        jobs=jobs)
            fusion["ran"] = run_context(command, device)
            atomic_write_json(Path(output_dir) / "decoding.json", fusion)
        name = "ablation.json"
    else:
        result = run_ablation(output_dir, seeds=seeds or 1, conditions=DEMO_CONDITIONS,
                              device=device, jobs=jobs, progress=progress)
        name = "ablation.json"
    result["wall_s"] = round(time.time() - start, 1)
    result["ran"] = run_context(command, device)
    atomic_write_json(Path(output_dir) / name, result)
    return result
