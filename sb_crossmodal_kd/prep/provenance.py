"""What a folder was built from: one JSON record, written atomically, refusing other settings.

Every resumable writer of the package keeps its folder's provenance this way: the KD data
chain (``prep.json``), a SynthCommands corpus (``corpus.json``), the recipes' manifests
(``prepare.json``, ``timit_prepare.json``) and each run of an ablation (``run.json``). Opening
the record of a folder made from another source or with other settings raises, naming the
keys that differ, before any work: such a folder is refused, never mixed in.

A record holds the ``source`` (what the folder was made from, compared like a setting) and
the ``settings``, laid out in one of two ways:

- flat (``nested=None``): the file is ``{**source, **settings}`` and nothing else;
- nested (``nested="settings"``, say): the file is ``{**source, "settings": settings}`` and
  what the work made beside them: outputs written once (:meth:`Provenance.write`), or the
  seconds and outputs of each step, rewritten after every step (:meth:`Provenance.step`).

Example
-------
>>> import tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> record = Provenance(folder / "made.json", {"n": 2}, "made/ holds data made")
>>> record.found, record.complete([])
(False, False)
>>> record.write()
>>> Provenance(folder / "made.json", {"n": 2}, "made/ holds data made").complete([])
True
>>> Provenance(folder / "made.json", {"n": 3}, "made/ holds data made")
Traceback (most recent call last):
...
sb_crossmodal_kd.io.OtherSettingsError: made/ holds data made with other settings (differs in: n). Choose another folder or delete that one; nothing was changed.

A nested record keeps each step's seconds and outputs:

>>> record = Provenance(folder / "prep.json", {"n": 2}, "prep/ holds data made",
...                     source={"format": "demo-1"}, nested="settings")
>>> record.step("count", 1.234, total=5)
>>> record.data
{'format': 'demo-1', 'settings': {'n': 2}, 'steps': {'count': 1.2}, 'outputs': {'total': 5}}
"""

import copy
import json
from pathlib import Path

from sb_crossmodal_kd.io import OtherSettingsError, atomic_write_json, refuse_other_settings

__all__ = ["Provenance"]


class Provenance:
    """The record of what the folder of ``path`` was built from (see the module docstring).

    Arguments
    ---------
    path : str or Path
        The record's JSON file.
    settings : dict
        What the work is a function of, compared key by key with a record already there.
    what : str
        What the folder holds, for the refusal: ``"<folder> holds ... made"``.
    source : dict, optional
        Top-level entries compared like settings: a format name, the data the folder was made
        from (``{"data_folder": ...}``).
    nested : str, optional
        The key the settings sit under; None: the file is flat (source and settings only).
    older : dict, optional
        Settings added since folders were first made, with the value those were made with:
        a record without them describes work made that way, so it is not refused.
    retired : tuple of str
        Settings that no longer exist and whose every value describes work still valid:
        dropped from a record before comparing.
    remedy : str
        What the refusal tells the user to do.
    error : type
        The refusal's exception (default :class:`~sb_crossmodal_kd.io.OtherSettingsError`).

    Raises
    ------
    error
        When the record at ``path`` holds another source or other settings.
    """

    def __init__(self, path, settings, what, source=None, nested=None, older=None, retired=(),
                 remedy="Choose another folder or delete that one", error=OtherSettingsError):
        self.path = Path(path)
        self.writes = True
        # As the file holds them (lists, not tuples), so that a record compares equal to them.
        self.source = json.loads(json.dumps(source or {}))
        self.settings = json.loads(json.dumps(settings))
        self.nested = nested
        self.found = self.path.is_file()
        if not self.found:
            self.data = ({**self.source, **self.settings} if nested is None
                         else {**self.source, nested: self.settings})
            return
        existing = json.loads(self.path.read_text())
        existing = existing if isinstance(existing, dict) else {}
        recorded = existing if nested is None else existing.get(nested)
        recorded = recorded if isinstance(recorded, dict) else {}
        for key, value in (older or {}).items():
            recorded.setdefault(key, copy.deepcopy(value))
        for key in retired:
            recorded.pop(key, None)
        if nested is not None:  # the outputs beside the settings are no part of the comparison
            recorded = {**{key: existing.get(key) for key in self.source}, **recorded}
        refuse_other_settings(recorded, {**self.source, **self.settings}, what, remedy, error)
        self.data = existing

    def complete(self, paths):
        """Whether the record was there and every one of ``paths`` is a file: the work is done."""
        return self.found and all(Path(path).is_file() for path in paths)

    def write(self, **outputs):
        """Writes the record, with ``outputs`` beside the settings (nested records only);
        with ``writes`` false (a process that is not the one to write it), only updates it."""
        if outputs:
            self._beside_settings()
        self.data.update(outputs)
        if self.writes:
            atomic_write_json(self.path, self.data)

    def step(self, name, seconds, **outputs):
        """Records that step ``name`` took ``seconds`` and made ``outputs``, and writes the
        record (``steps``: seconds by step; ``outputs``: the values of every step)."""
        self._beside_settings()
        self.data.setdefault("steps", {})[name] = round(seconds, 1)
        self.data.setdefault("outputs", {}).update(outputs)
        self.write()

    def _beside_settings(self):
        # In a flat record anything written would read as a setting, and refuse the folder.
        if self.nested is None:
            raise ValueError(f"{self.path}: a flat record holds its source and settings only")
