"""The hparams files the library runs, shipped inside the package.

- ``kd/``: the KD recipe's conditions (``am_alone.yaml``, ``hierarchy.yaml``, ...) over
  ``kd/base.yaml``; the ablation and ``sbkd demo`` train these;
- ``lm/``: the unit LMs (``subword.yaml``, ``monophone.yaml``, ``senone.yaml``), trained by the
  data chain;
- fragments for your own recipes to ``!include`` (by their path under :data:`HPARAMS`):
  ``moe.yaml`` (MoE feed-forward settings), ``heads.yaml`` (auxiliary heads), ``kd.yaml``
  (the objective).

The repository's recipes link to these folders (``recipes/SynthCommands/KD/hparams``, ...).

Example
-------
>>> sorted(p.name for p in KD_CONDITIONS.glob("hierarchy*.yaml"))[:2]
['hierarchy.yaml', 'hierarchy_minus_monophone.yaml']
>>> (UNIT_LMS / "senone.yaml").is_file()
True
"""

from pathlib import Path

__all__ = ["HPARAMS", "KD_CONDITIONS", "UNIT_LMS"]

HPARAMS = Path(__file__).resolve().parent
KD_CONDITIONS = HPARAMS / "kd"
UNIT_LMS = HPARAMS / "lm"
