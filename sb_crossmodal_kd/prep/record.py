"""``prep.json``, the record of what a prep folder was built from, and the values hparams
read of a prepared folder (:func:`prepared_setting`, :func:`senone_count`)."""

import json
from pathlib import Path

from sb_crossmodal_kd.prep.provenance import Provenance
from sb_crossmodal_kd.prep.settings import _OLDER_DATA_SETTINGS, _RETIRED_DATA_SETTINGS

__all__ = ["PREP_RECORD", "PREP_FORMAT", "prep_record", "senone_count", "prepared_setting"]

PREP_RECORD = "prep.json"
PREP_FORMAT = "sbkd-kd-prep-1"


def senone_count(tree_file):
    """Number of senones of a saved tree (for hparams: ``!apply:...senone_count [path]``)."""
    path = Path(tree_file)
    if not path.is_file():
        raise FileNotFoundError(
            f"senone tree {path} not found: prepare the KD data first "
            "(sb_crossmodal_kd.pipeline.prepare_kd_data or `sbkd ablation`)"
        )
    return json.loads(path.read_text())["num_senones"]


def prepared_setting(prep_folder, key):
    """One setting of prepared KD data (for hparams, so the recipe matches its data:
    ``vocab_size: !apply:sb_crossmodal_kd.pipeline.prepared_setting [<prep_folder>, vocab_size]``).

    Where a step recorded the value it used in ``prep.json``'s outputs (``vocab_size`` fitted
    to small transcripts), that value, else the setting.

    Example
    -------
    >>> import tempfile
    >>> prepared_setting(tempfile.mkdtemp(), "vocab_size")
    Traceback (most recent call last):
    ...
    FileNotFoundError: .../prep.json not found: prepare the KD data first (...)
    """
    path = Path(prep_folder) / PREP_RECORD
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: prepare the KD data first (the recipe's *_prepare.py, "
            "sb_crossmodal_kd.pipeline.prepare_kd_data_from_manifests or `sbkd ablation`)"
        )
    record = json.loads(path.read_text())
    return record.get("outputs", {}).get(key, record["settings"][key])


def prep_record(prep_dir, settings, source):
    """The :class:`~sb_crossmodal_kd.prep.provenance.Provenance` of a prep folder:
    ``prep.json``, with the settings, the data ``source`` (``{"data_folder": ...}`` or the
    manifests and LM text) and each step's seconds and outputs, rewritten after every step.

    Data prepared from another source or with other settings is refused, never mixed in; a
    record older than a setting counts as made with that setting's former value.

    Example
    -------
    >>> import tempfile, pathlib
    >>> from sb_crossmodal_kd.prep.settings import prep_settings
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> prep_record(folder, prep_settings(), {"data_folder": "/data"}).step("corpus", 2.0)
    >>> prep_record(folder, prep_settings(cache_k=8), {"data_folder": "/data"})
    Traceback (most recent call last):
    ...
    sb_crossmodal_kd.io.OtherSettingsError: ... holds KD data prepared with other settings (differs in: cache_k). ...
    """
    return Provenance(Path(prep_dir) / PREP_RECORD, settings, f"{prep_dir} holds KD data prepared",
                      source={"format": PREP_FORMAT, **source}, nested="settings",
                      older=_OLDER_DATA_SETTINGS, retired=_RETIRED_DATA_SETTINGS)
