"""``prep.json``, the record of what a prep folder was built from, and the values hparams
read of a prepared folder (:func:`prepared_setting`, :func:`senone_count`)."""

import copy
import json
from pathlib import Path

from sb_crossmodal_kd.io import atomic_write_json, refuse_other_settings
from sb_crossmodal_kd.prep.settings import _OLDER_DATA_SETTINGS, _RETIRED_DATA_SETTINGS

__all__ = ["senone_count", "prepared_setting"]


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
    path = Path(prep_folder) / "prep.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: prepare the KD data first (the recipe's *_prepare.py, "
            "sb_crossmodal_kd.pipeline.prepare_kd_data_from_manifests or `sbkd ablation`)"
        )
    record = json.loads(path.read_text())
    return record.get("outputs", {}).get(key, record["settings"][key])


class _Record:
    """``prep.json``: settings, outputs and step timings, rewritten after every step.

    ``source`` names the data (``{"data_folder": ...}`` or the manifests and LM text); data
    prepared from another source or with other settings is refused, never mixed in.
    """

    def __init__(self, prep_dir, settings, source):
        self.path = prep_dir / "prep.json"
        settings = json.loads(json.dumps(settings))  # as prep.json holds them (lists, not tuples)
        header = {"format": "sbkd-kd-prep-1", **source, "settings": settings}
        if self.path.is_file():
            existing = json.loads(self.path.read_text())
            if isinstance(existing.get("settings"), dict):
                for key, value in _OLDER_DATA_SETTINGS.items():
                    existing["settings"].setdefault(key, copy.deepcopy(value))
                for key in _RETIRED_DATA_SETTINGS:
                    existing["settings"].pop(key, None)
            # The settings and the data source, compared key by key.
            found = {"format": existing.get("format"), **{k: existing.get(k) for k in source},
                     **(existing.get("settings") or {})}
            refuse_other_settings(found, {"format": header["format"], **source, **settings},
                                  f"{prep_dir} holds KD data prepared")
            self.data = existing
        else:
            self.data = {**header, "steps": {}, "outputs": {}}

    def step(self, name, seconds, **outputs):
        self.data["steps"][name] = round(seconds, 1)
        self.data["outputs"].update(outputs)
        atomic_write_json(self.path, self.data)
