"""The monophone inventory: the 39 ARPAbet phones of CMUdict, without stress, plus silence.

Every component that labels frames or sequences with phones (the lexicon, the aligners, the
embedded corpus's reference timings, Kaldi import) uses this one inventory and its indices.

Example
-------
>>> len(PHONES), PHONES[SILENCE_INDEX]
(40, 'sil')
>>> phone_index("AA"), strip_stress("AH0")
(1, 'AH')
"""

SILENCE = "sil"

ARPABET = (
    "AA", "AE", "AH", "AO", "AW", "AY", "B", "CH", "D", "DH", "EH", "ER", "EY", "F", "G", "HH",
    "IH", "IY", "JH", "K", "L", "M", "N", "NG", "OW", "OY", "P", "R", "S", "SH", "T", "TH",
    "UH", "UW", "V", "W", "Y", "Z", "ZH",
)

# Silence first so that index 0 is the natural "no speech" class.
PHONES = (SILENCE,) + ARPABET
SILENCE_INDEX = 0
_INDEX = {p: i for i, p in enumerate(PHONES)}


def strip_stress(phone):
    """Removes CMUdict's stress digit: ``"EY1"`` -> ``"EY"``."""
    return phone.rstrip("012")


def phone_index(phone):
    """Index of ``phone`` (stress ignored) in :data:`PHONES`; ``ValueError`` if unknown."""
    key = strip_stress(phone)
    if key not in _INDEX:
        raise ValueError(f"{phone!r} is not one of the 39 ARPAbet phones or {SILENCE!r}")
    return _INDEX[key]
