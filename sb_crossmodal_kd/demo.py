"""The main job on the embedded corpus: the distillation ablation, as ``sbkd demo`` runs it.

Two presets of :func:`~sb_crossmodal_kd.ablation.run_ablation`:

- the demo (default): the conditions that carry the claim (:data:`DEMO_CONDITIONS`: the AM
  alone, label interpolation, one subword head, the hierarchy and the same heads on hard
  labels with no LM) on the dense encoder with one seed, sized for 15 minutes on 2 CPU
  cores (:data:`~sb_crossmodal_kd.prep.settings.PREP_DEFAULTS`,
  :data:`~sb_crossmodal_kd.ablation.DEMO_TRAINING`);
- the study (``study=True``): every condition (dense and MoE) on the same corpus and
  settings with 3 paired seeds (:data:`STUDY_TRAINING`, :data:`STUDY_PREP`).
"""

import os
import time
from pathlib import Path

from sb_crossmodal_kd.ablation import DEMO_TRAINING, run_ablation
from sb_crossmodal_kd.io import atomic_write_json

__all__ = ["DEMO_CONDITIONS", "STUDY_PREP", "STUDY_SEEDS", "STUDY_TRAINING", "run_demo"]

# hierarchy vs hierarchy_no_lm is the LM's own share; hierarchy_no_lm vs am_alone what the
# alignment alone gives. The level ablations and MoE variants: `sbkd ablation --conditions`.
DEMO_CONDITIONS = ("am_alone", "label_interpolation", "aux_subword", "hierarchy",
                   "hierarchy_no_lm")

STUDY_SEEDS = 3
# The study trains every condition as the demo does (converged AM, converged teachers),
# with 3 paired seeds.
STUDY_TRAINING = dict(DEMO_TRAINING)
STUDY_PREP = {}


def run_demo(output_dir, study=False, seeds=None, jobs=None, device="cpu", progress=True):
    """Runs the demo (or the study) into ``output_dir``; resumable.

    Returns the content of ``ablation.json``, to which it adds ``wall_s``: this call's wall
    time (of the remainder only, when it resumed a folder).
    """
    start = time.time()
    jobs = jobs or os.cpu_count() or 1
    if study:
        result = run_ablation(output_dir, seeds=seeds or STUDY_SEEDS, prep=STUDY_PREP,
                              training=STUDY_TRAINING, device=device, jobs=jobs,
                              progress=progress)
    else:
        result = run_ablation(output_dir, seeds=seeds or 1, conditions=DEMO_CONDITIONS,
                              device=device, jobs=jobs, progress=progress)
    result["wall_s"] = round(time.time() - start, 1)
    atomic_write_json(Path(output_dir) / "ablation.json", result)
    return result
