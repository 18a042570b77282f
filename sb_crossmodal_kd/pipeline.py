"""The KD data chain and the KD recipe's data hook, under the names that hparams files,
recipes and user code import (``!apply:sb_crossmodal_kd.pipeline.prepared_setting``, ...).

The code lives in :mod:`sb_crossmodal_kd.prep` (the chain: settings, ``prep.json``, manifests,
LM text, steps, unit LMs) and :mod:`sb_crossmodal_kd.kd_data` (the training-time hook); this
module re-exports their public names.

Example
-------
>>> from sb_crossmodal_kd.prep.settings import prep_settings as settings_at_home
>>> prep_settings is settings_at_home
True
"""

from sb_crossmodal_kd.kd_data import add_kd_items, kd_unit_types, teacher_unit_types
from sb_crossmodal_kd.prep.chain import STEPS, prepare_kd_data, prepare_kd_data_from_manifests
from sb_crossmodal_kd.prep.lm_text import LM_SAMPLE_SEED
from sb_crossmodal_kd.prep.manifests import MANIFEST_SPLITS, SAMPLE_RATE
from sb_crossmodal_kd.prep.record import prepared_setting, senone_count
from sb_crossmodal_kd.prep.settings import (
    PREP_DEFAULTS,
    prep_settings,
    prep_settings_file,
)

__all__ = ["PREP_DEFAULTS", "prep_settings", "prep_settings_file", "prepare_kd_data",
           "prepare_kd_data_from_manifests", "add_kd_items", "senone_count", "prepared_setting",
           "teacher_unit_types", "STEPS", "kd_unit_types",
           "MANIFEST_SPLITS", "SAMPLE_RATE", "LM_SAMPLE_SEED"]
