"""The KD data chain's settings: their defaults, overrides from code or a yaml file, and the
values data prepared before a setting existed was built with.

Example
-------
>>> settings = prep_settings(vocab_size=64)
>>> settings["vocab_size"], settings["splits"]
(64, ['train'])
"""

import copy
from pathlib import Path

from sb_crossmodal_kd.units.types import lm_unit_types

__all__ = ["PREP_DEFAULTS", "prep_settings", "prep_settings_file"]


# Sized for `sbkd demo` (its five conditions within 15 minutes on 2 CPU cores): see the KD
# README.
PREP_DEFAULTS = {
    # 1,200 train utterances for 9 epochs beat 600 for 15 at about the same cost (valid WER
    # 47.5 vs 54.3, the AM alone): more sentences, not more passes over them, is what
    # generalises to unseen voices. Valid and test keep their sizes.
    "corpus": {"n_train": 1200, "n_valid": 100, "n_test": 300, "n_text": 5000,
               "n_text_valid": 500},
    "vocab_size": 40,  # as the KD recipe's CTC output
    # A vocab_size the train transcripts cannot make (a task of a few words: digits,
    # commands) becomes the largest they can, with a warning, and prep.json's outputs record
    # the size used (what prepared_setting gives the recipe); False refuses it instead.
    "fit_vocab_size": True,
    # Pronunciations: a lexicon file (CMUdict, librispeech-lexicon.txt, Kaldi/MFA lexicon.txt)
    # or None for the CMUdict shipped with the package; aligner and unit LMs read the same one.
    "lexicon": None,
    "oov_policy": "g2p",
    "aligner_utterances": 200,  # the phone model trains on the first N train utterances
    "aligner": {"iterations": 2, "epochs": 2},
    "tree": {"max_leaves": 200, "min_count": 20, "min_gain": 50.0},
    # Unit-LM overrides: every LM sentence, 6 epochs (held-out perplexity 0.2 to 0.5 % lower
    # after the last epoch than after the fifth: flat)
    "lm": {"number_of_epochs": 6, "max_train_sentences": None,
           "lm_model": {"hidden_size": 128, "embedding_dim": 32}},
    "cache_k": 32,
    # Temperature of each teacher cache (one number for every unit type with an LM, or
    # numbers by unit type); the KD recipe's heads must use the same tau.
    "teacher_tau": 1.0,
    "splits": ["train"],  # the Brain reads units and teachers in training only
}
# Settings added since data was first prepared, with the value older data was built with:
# a prep.json without them describes data made that way, so it is not refused.
_OLDER_DATA_SETTINGS = {"teacher_tau": dict.fromkeys(lm_unit_types(), 1.0),
                        "lexicon": None,
                        # data that was built never needed fitting: the same either way
                        "fit_vocab_size": True}
# Settings that no longer exist and whose every value describes data that is still valid:
# ``resample`` (true: 16 kHz copies of the manifests' audio; false: no other rate allowed),
# now that audio at any rate is resampled on load.
_RETIRED_DATA_SETTINGS = ("resample",)


def prep_settings(**overrides):
    """:data:`PREP_DEFAULTS` updated with ``overrides`` (nested dicts are merged).

    Example
    -------
    >>> prep_settings(corpus={"n_train": 50})["corpus"]["n_train"]
    50
    >>> prep_settings(corpus={"n_train": 50})["corpus"]["n_test"]
    300
    >>> prep_settings(vocab=3)
    Traceback (most recent call last):
    ...
    KeyError: "Unknown prep setting 'vocab'; known: ['aligner', 'aligner_utterances', ..."

    ``teacher_tau`` takes one number for every unit type, or some of them by name:

    >>> prep_settings(teacher_tau=2)["teacher_tau"]
    {'subword': 2.0, 'monophone': 2.0, 'senone': 2.0}
    >>> prep_settings(teacher_tau={"senone": 0.5})["teacher_tau"]["senone"]
    0.5
    """
    settings = copy.deepcopy(PREP_DEFAULTS)
    units = lm_unit_types()  # every unit type whose LM the chain trains has a cache
    settings["teacher_tau"] = dict.fromkeys(units, settings["teacher_tau"])
    for key, value in overrides.items():
        if key not in settings:
            raise KeyError(f"Unknown prep setting {key!r}; known: {sorted(settings)}")
        if key == "teacher_tau" and isinstance(value, int | float):
            value = dict.fromkeys(units, value)
        if isinstance(settings[key], dict) and isinstance(value, dict):
            settings[key].update(value)
        else:
            settings[key] = value
    settings["splits"] = sorted(set(settings["splits"]) | {"train"})
    taus = settings["teacher_tau"]
    if not isinstance(taus, dict) or set(taus) != set(units):
        raise KeyError(f"prep setting teacher_tau is {taus!r}: give a number, or numbers by "
                       f"unit type of {units}")
    bad = {unit: tau for unit, tau in taus.items()
           if isinstance(tau, bool) or not isinstance(tau, int | float) or tau <= 0}
    if bad:
        raise ValueError(f"prep setting teacher_tau: temperatures must be numbers > 0, got {bad}")
    settings["teacher_tau"] = {unit: float(tau) for unit, tau in taus.items()}
    return settings


def prep_settings_file(path=None, **overrides):
    """:func:`prep_settings` from a yaml file of overrides (a recipe's ``hparams/prep.yaml``),
    then ``overrides``; no file: the defaults.

    Example
    -------
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "prep.yaml"
    >>> _ = path.write_text("vocab_size: 256\\ntree: {max_leaves: 2000}\\n")
    >>> settings = prep_settings_file(path, cache_k=16)
    >>> settings["vocab_size"], settings["tree"]["max_leaves"], settings["tree"]["min_count"]
    (256, 2000, 20)
    """
    import ruamel.yaml

    from_file = {}
    if path is not None:
        with open(path, encoding="utf-8") as handle:
            from_file = ruamel.yaml.YAML(typ="safe").load(handle) or {}
    return prep_settings(**{**from_file, **overrides})


def _lexicon_file(settings):
    """The prep's lexicon file as an absolute path (the LM recipe runs in its own folder), or
    None for the shipped CMUdict; a missing file is named before any work."""
    if settings.get("lexicon") is None:
        return None
    path = Path(settings["lexicon"]).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"lexicon {settings['lexicon']!r} (prep setting lexicon) not "
                                "found: give a lexicon file, or null for the shipped CMUdict")
    return path
