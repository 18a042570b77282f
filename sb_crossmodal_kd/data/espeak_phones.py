"""Maps eSpeak NG's English phoneme mnemonics to the ARPAbet inventory of ``units.phones``.

eSpeak marks stress with a prefix (``'`` primary, ``,`` secondary, ``%`` unstressed) and
variants with a suffix (``t#`` a flap, ``I2`` a reduced vowel); r-coloured vowels and
syllabic l are single eSpeak phonemes but two ARPAbet phones (``O@`` -> ``AO R``).

Example
-------
>>> espeak_to_arpabet("'O@")
('AO', 'R')
>>> espeak_to_arpabet("t#"), espeak_to_arpabet("_:")
(('T',), ('sil',))
>>> espeak_to_arpabet(";")
()
"""

from sb_crossmodal_kd.units.phones import SILENCE

_TABLE = {
    # consonants
    "p": "P", "b": "B", "t": "T", "d": "D", "k": "K", "g": "G", "f": "F", "v": "V",
    "T": "TH", "D": "DH", "s": "S", "z": "Z", "S": "SH", "Z": "ZH", "h": "HH", "tS": "CH",
    "dZ": "JH", "m": "M", "n": "N", "N": "NG", "l": "L", "r": "R", "w": "W", "j": "Y",
    "?": "T", "x": "K", "C": "HH",
    # vowels
    "a": "AE", "aa": "AE", "a#": "AH", "A:": "AA", "A": "AA", "0": "AA", "@": "AH",
    "V": "AH", "3": "ER", "3:": "ER", "E": "EH", "e": "EH", "eI": "EY", "i": "IY",
    "i:": "IY", "I": "IH", "aI": "AY", "aU": "AW", "O": "AO", "O:": "AO", "O2": "AO",
    "OI": "OY", "oU": "OW", "o": "OW", "U": "UH", "u:": "UW", "u": "UW",
    # two-phone units
    "A@": "AA R", "O@": "AO R", "o@": "AO R", "e@": "EH R", "i@": "IH R", "i@3": "IH R",
    "IR": "IH R", "VR": "AH R", "U@": "UH R", "@L": "AH L", "aI@": "AY ER", "aU@": "AW ER",
    "aI3": "AY ER",
}
_PAUSES = ("_",)
_ZERO_WIDTH = (";",)  # palatalisation mark: modifies the previous consonant, no time of its own
_SUFFIXES = "#[2-5^"


def espeak_to_arpabet(mnemonic):
    """Returns the tuple of ARPAbet phones (or ``('sil',)``) for one eSpeak phoneme.

    Raises ``ValueError`` naming the mnemonic when it has no mapping.
    """
    name = mnemonic.lstrip("'%,=")
    if name.startswith(_PAUSES):
        return (SILENCE,)
    if name in _ZERO_WIDTH:
        return ()
    candidate = name
    while candidate:
        if candidate in _TABLE:
            return tuple(_TABLE[candidate].split())
        if candidate[-1] in _SUFFIXES:
            candidate = candidate[:-1]
            continue
        break
    raise ValueError(
        f"No ARPAbet mapping for the eSpeak phoneme {mnemonic!r}; "
        "add it to sb_crossmodal_kd/data/espeak_phones.py"
    )


def phone_segments(phonemes, num_samples):
    """Turns eSpeak phoneme events into contiguous ARPAbet segments covering the audio.

    Arguments
    ---------
    phonemes : list of (str, int)
        (eSpeak mnemonic, start sample), in time order.
    num_samples : int
        Length of the audio; the last phoneme ends there.

    Returns
    -------
    list of (str, int, int)
        (phone, start sample, end sample); audio before the first phoneme is ``sil``;
        a two-phone unit's time is split evenly; adjacent silences are merged.

    Example
    -------
    >>> phone_segments([("h", 100), ("@L", 200), ("_", 400)], 500)
    [('sil', 0, 100), ('HH', 100, 200), ('AH', 200, 300), ('L', 300, 400), ('sil', 400, 500)]
    """
    segments = []

    def push(phone, start, end):
        if end <= start:
            return
        if segments and segments[-1][0] == phone == SILENCE:
            segments[-1] = (phone, segments[-1][1], end)
        else:
            segments.append((phone, start, end))

    events = [(espeak_to_arpabet(m), s) for m, s in phonemes]
    events = [(p, min(max(s, 0), num_samples)) for p, s in events if p]
    if events:
        push(SILENCE, 0, events[0][1])
    for i, (phones, start) in enumerate(events):
        end = events[i + 1][1] if i + 1 < len(events) else num_samples
        step = (end - start) / len(phones)
        for j, phone in enumerate(phones):
            push(phone, round(start + j * step), round(start + (j + 1) * step))
    if not events:
        push(SILENCE, 0, num_samples)
    return segments
