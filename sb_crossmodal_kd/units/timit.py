"""TIMIT's phone sets: the 61 labels of the hand segmentation, the standard 39-phone folding,
and their mapping onto the package's monophone inventory (:mod:`sb_crossmodal_kd.units.phones`).

**61 -> 39.** The folding of Lee and Hon (1989), "Speaker-independent phone recognition
using hidden Markov models", as Kaldi's ``egs/timit/s5/conf/phones.60-48-39.map`` gives it:
closures, pauses and epenthetic silence become ``sil``; ``ao -> aa``, ``ax, ax-h -> ah``,
``axr -> er``, ``el -> l``, ``em -> m``, ``en, nx -> n``, ``eng -> ng``, ``hv -> hh``,
``ix -> ih``, ``ux -> uw``, ``zh -> sh``; the glottal stop ``q`` is removed (it has no
39-set label; its frames are left unlabelled, not merged into a neighbour).

**39 -> package.** The package's inventory is ``sil`` plus the 39 ARPAbet phones of
CMUdict. 37 of TIMIT's 39 classes are the same phone under an upper-case name and ``sil`` is
``sil``. The differences:

- ``dx`` (the flap, a 39-set class) has no CMUdict phone: it maps to ``T``, which is how
  CMUdict spells most flapped stops (``butter`` B AH1 T ER0); flaps from /d/ (``ladder``)
  are thereby labelled ``T`` too.
- ``AO`` and ``ZH`` are CMUdict phones that the 39-set folds away (into ``aa`` and ``sh``):
  under :data:`TIMIT_TO_PACKAGE_39` no frame is ever labelled with them.
  :data:`TIMIT_TO_PACKAGE` maps the 61 labels straight to the package inventory instead and
  keeps ``ao -> AO``, ``zh -> ZH`` (what a CMUdict lexicon writes), otherwise as the folding.

So frame accuracy over :data:`TIMIT_TO_PACKAGE_39` labels is the usual TIMIT 39-class
accuracy except that flaps count as ``T``.

Example
-------
>>> len(TIMIT_PHONES_61), len(TIMIT_PHONES_39)
(61, 39)
>>> fold_61_to_39(["h#", "sh", "ix", "hv", "q", "eh", "dcl", "jh", "ih", "zh", "h#"])
['sil', 'sh', 'ih', 'hh', 'eh', 'sil', 'jh', 'ih', 'sh', 'sil']
>>> [TIMIT_TO_PACKAGE_39[p] for p in ("pau", "ao", "zh", "dx", "ix")]
['sil', 'AA', 'SH', 'T', 'IH']
>>> [TIMIT_TO_PACKAGE[p] for p in ("pau", "ao", "zh", "dx", "ix")]
['sil', 'AO', 'ZH', 'T', 'IH']
>>> TIMIT_TO_PACKAGE["q"] is None
True
"""

from sb_crossmodal_kd.units.phones import SILENCE

# 61 labels -> 39-set label (None: removed). Order as in Kaldi's phones.60-48-39.map.
TIMIT_61_TO_39 = {
    "aa": "aa", "ae": "ae", "ah": "ah", "ao": "aa", "aw": "aw", "ax": "ah", "ax-h": "ah",
    "axr": "er", "ay": "ay", "b": "b", "bcl": "sil", "ch": "ch", "d": "d", "dcl": "sil",
    "dh": "dh", "dx": "dx", "eh": "eh", "el": "l", "em": "m", "en": "n", "eng": "ng",
    "epi": "sil", "er": "er", "ey": "ey", "f": "f", "g": "g", "gcl": "sil", "h#": "sil",
    "hh": "hh", "hv": "hh", "ih": "ih", "ix": "ih", "iy": "iy", "jh": "jh", "k": "k",
    "kcl": "sil", "l": "l", "m": "m", "n": "n", "ng": "ng", "nx": "n", "ow": "ow", "oy": "oy",
    "p": "p", "pau": "sil", "pcl": "sil", "q": None, "r": "r", "s": "s", "sh": "sh", "t": "t",
    "tcl": "sil", "th": "th", "uh": "uh", "uw": "uw", "ux": "uw", "v": "v", "w": "w", "y": "y",
    "z": "z", "zh": "sh",
}

TIMIT_PHONES_61 = tuple(TIMIT_61_TO_39)
TIMIT_PHONES_39 = tuple(sorted({p for p in TIMIT_61_TO_39.values() if p is not None}))

# 39-set label -> package phone: the same phone upper-cased; the flap has no CMUdict phone.
TIMIT_39_TO_PACKAGE = {
    p: SILENCE if p == "sil" else ("T" if p == "dx" else p.upper()) for p in TIMIT_PHONES_39
}

# 61 labels -> package phone through the 39-set (None: q).
TIMIT_TO_PACKAGE_39 = {
    p: None if p39 is None else TIMIT_39_TO_PACKAGE[p39] for p, p39 in TIMIT_61_TO_39.items()
}

# 61 labels -> package phone, keeping the CMUdict distinctions the 39-set folds away.
TIMIT_TO_PACKAGE = dict(TIMIT_TO_PACKAGE_39, ao="AO", zh="ZH")

PHONE_MAPS = {"timit39": TIMIT_TO_PACKAGE_39, "cmudict": TIMIT_TO_PACKAGE}


def check_timit_phone(phone, where):
    """Returns ``phone`` (a TIMIT label) lower-cased; ``ValueError`` naming ``where`` if it is
    not one of the 61.

    Example
    -------
    >>> check_timit_phone("PCL", "x.PHN line 3")
    'pcl'
    >>> check_timit_phone("xx", "x.PHN line 3")
    Traceback (most recent call last):
    ...
    ValueError: x.PHN line 3: 'xx' is not one of TIMIT's 61 phone labels (aa, ae, ...
    """
    key = phone.lower()
    if key not in TIMIT_61_TO_39:
        raise ValueError(
            f"{where}: {phone!r} is not one of TIMIT's 61 phone labels "
            f"({', '.join(TIMIT_PHONES_61)})"
        )
    return key


def fold_61_to_39(phones):
    """Folds a sequence of TIMIT labels to the 39-set, dropping ``q``.

    Arguments
    ---------
    phones : iterable of str
        TIMIT labels (any case).

    Returns
    -------
    list of str
        39-set labels. Adjacent equal labels are kept (``dcl d`` -> ``sil d``; ``bcl`` before
        ``pau`` -> ``sil sil``): merging them, as phone-recognition scoring does, is the
        caller's choice.
    """
    folded = [TIMIT_61_TO_39[check_timit_phone(p, "fold_61_to_39")] for p in phones]
    return [p for p in folded if p is not None]


def to_package_phones(phones, phone_set="timit39"):
    """Maps TIMIT labels to the package inventory, dropping ``q``.

    Arguments
    ---------
    phones : iterable of str
        TIMIT labels (any case).
    phone_set : str
        ``"timit39"`` (through the 39-set) or ``"cmudict"`` (keeps ``AO``, ``ZH``).

    Returns
    -------
    list of str
        Phones of :data:`~sb_crossmodal_kd.units.phones.PHONES`.

    Example
    -------
    >>> to_package_phones(["h#", "ao", "q", "dx"], "cmudict")
    ['sil', 'AO', 'T']
    """
    table = phone_map(phone_set)
    mapped = [table[check_timit_phone(p, "to_package_phones")] for p in phones]
    return [p for p in mapped if p is not None]


def phone_map(phone_set):
    """The 61-label -> package table named ``phone_set`` (``"timit39"`` or ``"cmudict"``)."""
    if phone_set not in PHONE_MAPS:
        raise ValueError(f"phone_set must be one of {sorted(PHONE_MAPS)}, got {phone_set!r}")
    return PHONE_MAPS[phone_set]
