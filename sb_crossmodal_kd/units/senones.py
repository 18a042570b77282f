"""Senones: triphone HMM states tied by a phonetic decision tree.

Every phone has 3 states (begin, middle, end). A context-dependent state is
``(left phone, phone, right phone, state)``; contexts are the neighbouring phones of the
utterance's phone sequence (across words; ``sil`` at the utterance edges), exactly as text
gives them, so that text alone yields the same senone sequence as the aligned audio. Silence
states are context independent (3 senones).

Tying follows Young, Odell and Woodland (1994) and Kaldi: one tree per (phone, state) root;
a node is split by the yes/no question about the left or right phone's class (from
:data:`QUESTIONS`) that most increases the log-likelihood of the frames' features under one
diagonal Gaussian per node. Splits are chosen greedily over all trees (best gain first) until
``max_leaves`` senones, or no split has ``gain >= min_gain`` with ``>= min_count`` frames on
each side. Every node answers every question, so any triphone state, seen in training or
not, maps to a leaf.

Interface used by the rest of the package:

- ``tree = SenoneTree.build(stats, max_leaves=..., min_count=..., min_gain=...)`` with
  ``stats`` from :class:`TriphoneStats` (``add(phones, feature_labels, features)``);
- ``tree.senones(phones) -> list[int]`` (3 ids per phone, ``sil`` included if given);
- ``tree.frame_senones(phones, phone_segments)`` -> senone id per frame of an alignment;
- ``tree.num_senones``, ``tree.depth``, ``tree.hash``, ``tree.save(path)``,
  ``SenoneTree.load(path)``.

Example
-------
>>> import torch
>>> stats = TriphoneStats(dim=2)
>>> g = torch.Generator().manual_seed(0)
>>> for left in ["M", "N", "S", "T"]:  # a nasal left context shifts AA's features
...     feats = torch.randn(30, 2, generator=g) + (4.0 if left in ("M", "N") else 0.0)
...     stats.add([left, "AA", "K"], [0] * 10 + [1] * 10 + [2] * 10, feats)
>>> tree = SenoneTree.build(stats, max_leaves=200, min_count=5, min_gain=10.0)
>>> a, b, c = (tree.senones([left, "AA", "K"])[4] for left in ["M", "NG", "S"])
>>> a == b != c   # unseen left context NG falls in with the other nasals
True
"""

import hashlib
import heapq
import json
import math

import numpy as np
import torch

from sb_crossmodal_kd.io import atomic_write_text
from sb_crossmodal_kd.units.phones import ARPABET, PHONES, SILENCE

STATES = 3

_VOWELS = "AA AE AH AO AW AY EH ER EY IH IY OW OY UH UW".split()
# Phone classes asked about the left and right context, broad to narrow (ties go to the broader
# class, which generalises better to unseen contexts). Single phones are appended below.
QUESTIONS = {
    "silence": [SILENCE],
    "vowel": _VOWELS,
    "consonant": [p for p in ARPABET if p not in _VOWELS],
    "voiced": _VOWELS + "B D G JH V DH Z ZH M N NG L R W Y".split(),
    "unvoiced": "P T K CH F TH S SH HH".split(),
    "front_vowel": "AE EH EY IH IY".split(),
    "central_vowel": "AH ER".split(),
    "back_vowel": "AA AO OW UH UW".split(),
    "diphthong": "AW AY EY OW OY".split(),
    "high_vowel": "IH IY UH UW".split(),
    "low_vowel": "AA AE AO AW AY".split(),
    "rounded": "AO OW OY UH UW W".split(),
    "sonorant": _VOWELS + "M N NG L R W Y".split(),
    "obstruent": "B D G P T K CH JH F V TH DH S Z SH ZH HH".split(),
    "stop": "B D G P T K".split(),
    "voiced_stop": "B D G".split(),
    "unvoiced_stop": "P T K".split(),
    "affricate": "CH JH".split(),
    "fricative": "F V TH DH S Z SH ZH HH".split(),
    "sibilant": "S Z SH ZH CH JH".split(),
    "nasal": "M N NG".split(),
    "liquid": "L R".split(),
    "glide": "W Y".split(),
    "approximant": "L R W Y".split(),
    "labial": "B P M F V W".split(),
    "dental": "TH DH".split(),
    "alveolar": "T D N S Z L".split(),
    "postalveolar": "SH ZH CH JH R Y".split(),
    "velar": "K G NG".split(),
    "glottal": ["HH"],
    "r_coloured": "ER R".split(),
}
QUESTIONS.update({f"is_{p}": [p] for p in PHONES if f"is_{p}" not in QUESTIONS})


def contexts(phones):
    """``(left, phone, right)`` for each phone of a sequence (``sil`` beyond the edges).

    Silences inside the sequence are contexts like any phone.

    Example
    -------
    >>> contexts(["K", "AE", "T"])
    [('sil', 'K', 'AE'), ('K', 'AE', 'T'), ('AE', 'T', 'sil')]
    """
    padded = [SILENCE] + list(phones) + [SILENCE]
    return [(padded[i - 1], padded[i], padded[i + 1]) for i in range(1, len(padded) - 1)]


def split_states(start, end, states=STATES):
    """Splits frames ``[start, end)`` into ``states`` contiguous, near-equal parts.

    Returns the state index of each frame. A segment shorter than ``states`` frames keeps the
    first and last states (one frame: the middle state) and skips the rest.

    Example
    -------
    >>> split_states(0, 7).tolist(), split_states(10, 12).tolist(), split_states(3, 4).tolist()
    ([0, 0, 0, 1, 1, 2, 2], [0, 2], [1])
    """
    n = end - start
    if n >= states:
        return np.arange(n) * states // n
    if n == 1:
        return np.array([states // 2])
    return np.round(np.linspace(0, states - 1, n)).astype(np.int64)


class TriphoneStats:
    """Accumulates single-Gaussian statistics (count, sum, sum of squares) per triphone state.

    Arguments
    ---------
    dim : int
        Feature dimension.
    """

    def __init__(self, dim):
        self.dim = dim
        self.stats = {}  # (left, phone, right, state) -> [count, sum (D,), sumsq (D,)]

    def add(self, phones, feature_labels, features):
        """Adds one utterance's aligned frames.

        Arguments
        ---------
        phones : list of str
            The utterance's phone sequence in the order of the alignment's positions (its
            contexts are taken from this sequence, see :func:`contexts`).
        feature_labels : array-like of int, shape ``(T,)``
            Position in ``phones`` of each frame (``-1``: frame ignored).
        features : torch.Tensor or numpy.ndarray, shape ``(T, dim)``
            The frames' features (same rate as ``feature_labels``).
        """
        feats = torch.as_tensor(features, dtype=torch.float64).cpu().numpy()
        labels = np.asarray(feature_labels)
        if feats.shape != (len(labels), self.dim):
            raise ValueError(
                f"TriphoneStats.add: features {feats.shape} do not match {len(labels)} labels "
                f"of dimension {self.dim}"
            )
        ctx = contexts(phones)
        # Segment boundaries: runs of one position.
        change = np.flatnonzero(np.diff(labels)) + 1
        starts = np.concatenate([[0], change])
        ends = np.concatenate([change, [len(labels)]])
        for start, end in zip(starts, ends, strict=True):
            pos = int(labels[start])
            if pos < 0:
                continue
            states = split_states(start, end)
            left, phone, right = ctx[pos]
            if phone == SILENCE:
                left = right = SILENCE
            for s in range(STATES):
                x = feats[start:end][states == s]
                if len(x) == 0:
                    continue
                key = (left, phone, right, s)
                entry = self.stats.setdefault(key, [0, np.zeros(self.dim), np.zeros(self.dim)])
                entry[0] += len(x)
                entry[1] += x.sum(0)
                entry[2] += (x * x).sum(0)

    def update(self, other):
        """Adds the statistics of ``other`` (e.g. another shard's), its new states last."""
        if other.dim != self.dim:
            raise ValueError(f"TriphoneStats.update: dimension {other.dim}, not {self.dim}")
        for key, (count, total, squares) in other.stats.items():
            entry = self.stats.setdefault(key, [0, np.zeros(self.dim), np.zeros(self.dim)])
            entry[0] += count
            entry[1] += total
            entry[2] += squares

    @property
    def frames(self):
        """Total number of accumulated frames."""
        return sum(v[0] for v in self.stats.values())


def _loglik(count, total, sq, var_floor):
    """Log-likelihood of frames under their ML diagonal Gaussian; arrays broadcast over [..., D]."""
    count = np.maximum(count, 1e-10)
    mean = total / count[..., None]
    var = np.maximum(sq / count[..., None] - mean**2, var_floor)
    dim = total.shape[-1]
    return -0.5 * count * (np.log(var).sum(-1) + dim * (1.0 + math.log(2 * math.pi)))


class SenoneTree:
    """A built (or loaded) tying tree: maps any triphone state to a senone id.

    Senone ids ``0, 1, 2`` are the silence states; the rest number the leaves of the
    (phone, state) trees in :data:`~sb_crossmodal_kd.units.phones.PHONES` order.

    Arguments
    ---------
    trees : dict
        ``"PHONE/state"`` -> node; a node is ``{"leaf": id}`` or ``{"side": "L" | "R",
        "question": name, "yes": node, "no": node}``.
    questions : dict
        Question name -> list of phones.
    settings : dict
        How the tree was built (recorded for reports).
    """

    def __init__(self, trees, questions, settings=None):
        self.trees = trees
        self.questions = {k: frozenset(v) for k, v in questions.items()}
        self.settings = settings or {}
        missing = [f"{p}/{s}" for p in PHONES for s in range(STATES) if f"{p}/{s}" not in trees]
        if missing:
            raise ValueError(f"SenoneTree: no tree for the states {missing[:6]}...")
        self.num_senones = 1 + max(self._leaves(n) for n in trees.values())
        text = json.dumps(
            {"trees": self.trees, "questions": {k: sorted(v) for k, v in self.questions.items()}},
            sort_keys=True,
        )
        self.hash = "tree:" + hashlib.sha256(text.encode()).hexdigest()[:16]

    @staticmethod
    def _leaves(node):
        if "leaf" in node:
            return node["leaf"]
        return max(SenoneTree._leaves(node["yes"]), SenoneTree._leaves(node["no"]))

    @property
    def depth(self):
        """Largest number of questions on a root-to-leaf path."""

        def depth(node):
            return 0 if "leaf" in node else 1 + max(depth(node["yes"]), depth(node["no"]))

        return max(depth(n) for n in self.trees.values())

    def senone(self, left, phone, right, state):
        """Senone id of one triphone state (contexts may be unseen)."""
        node = self.trees[f"{phone}/{state}"]
        while "leaf" not in node:
            context = left if node["side"] == "L" else right
            node = node["yes"] if context in self.questions[node["question"]] else node["no"]
        return node["leaf"]

    def senones(self, phones):
        """Senone sequence of a phone sequence: ``3 * len(phones)`` ids (begin, middle, end)."""
        out = []
        for left, phone, right in contexts(phones):
            out.extend(self.senone(left, phone, right, s) for s in range(STATES))
        return out

    def frame_senones(self, phones, feature_labels):
        """Senone id per frame of an alignment.

        Arguments
        ---------
        phones : list of str
            The phone sequence whose positions the alignment uses.
        feature_labels : array-like of int, shape ``(T,)``
            Position in ``phones`` per frame (``-1``: no unit; its senone is ``-1`` too).

        Returns
        -------
        senones : numpy.ndarray, shape ``(T,)``
            Senone id per frame.
        positions : numpy.ndarray, shape ``(T,)``
            Position per frame in :meth:`senones` ``(phones)`` (``3 * phone position + state``).
        """
        labels = np.asarray(feature_labels)
        ids = np.asarray(self.senones(phones), dtype=np.int64)
        positions = np.full(len(labels), -1, dtype=np.int64)
        change = np.flatnonzero(np.diff(labels)) + 1
        starts = np.concatenate([[0], change]).astype(int)
        ends = np.concatenate([change, [len(labels)]]).astype(int)
        for start, end in zip(starts, ends, strict=True):
            pos = int(labels[start])
            if pos >= 0:
                positions[start:end] = STATES * pos + split_states(start, end)
        senones = np.where(positions >= 0, ids[np.maximum(positions, 0)], -1)
        return senones, positions

    @classmethod
    def build(cls, stats, max_leaves=500, min_count=20, min_gain=50.0, questions=None):
        """Grows the trees greedily from :class:`TriphoneStats`.

        Arguments
        ---------
        stats : TriphoneStats
        max_leaves : int
            Largest number of senones (silence's 3 included).
        min_count : int
            Fewest frames allowed on each side of a split.
        min_gain : float
            Smallest log-likelihood gain for a split.
        questions : dict, optional
            Phone classes (default :data:`QUESTIONS`).
        """
        questions = QUESTIONS if questions is None else questions
        names = list(questions)
        if not stats.stats:
            raise ValueError("SenoneTree.build: no statistics; align some audio first")
        # Variance floor: 1% of the global variance per dimension (as in Kaldi's tree building).
        all_n = sum(v[0] for v in stats.stats.values())
        all_s = sum(v[1] for v in stats.stats.values())
        all_q = sum(v[2] for v in stats.stats.values())
        var_floor = 0.01 * np.maximum(all_q / all_n - (all_s / all_n) ** 2, 1e-8)
        member = {
            side: np.array([[p in questions[q] for p in PHONES] for q in names])
            for side in ("L", "R")
        }
        phone_pos = {p: i for i, p in enumerate(PHONES)}

        # Per root: context arrays (left index, right index, count, sum, sumsq).
        roots = {}
        for (left, phone, right, s), (n, tot, sq) in stats.stats.items():
            roots.setdefault(f"{phone}/{s}", []).append((phone_pos[left], phone_pos[right], n, tot, sq))
        data = {}
        for key, rows in roots.items():
            data[key] = (
                np.array([r[0] for r in rows]),
                np.array([r[1] for r in rows]),
                np.array([r[2] for r in rows], dtype=np.float64),
                np.stack([r[3] for r in rows]),
                np.stack([r[4] for r in rows]),
            )

        def best_split(key, idx):
            left, right, n, tot, sq = (a[idx] for a in data[key])
            parent = _loglik(n.sum(), tot.sum(0), sq.sum(0), var_floor)
            best = (-np.inf, None, None, None)
            for side, ctx in (("L", left), ("R", right)):
                yes = member[side][:, ctx].astype(np.float64)  # (Q, contexts)
                n_yes, n_no = yes @ n, (1 - yes) @ n
                gain = (
                    _loglik(n_yes, yes @ tot, yes @ sq, var_floor)
                    + _loglik(n_no, (1 - yes) @ tot, (1 - yes) @ sq, var_floor)
                    - parent
                )
                gain[(n_yes < min_count) | (n_no < min_count)] = -np.inf
                q = int(np.argmax(gain))  # first maximum: the broadest of equal questions
                if gain[q] > best[0]:
                    best = (float(gain[q]), side, q, yes[q].astype(bool))
            return best

        trees = {f"{SILENCE}/{s}": {"leaf": None} for s in range(STATES)}
        heap, counter = [], 0
        n_leaves = 0
        for phone in PHONES:
            for s in range(STATES):
                key = f"{phone}/{s}"
                node = trees.setdefault(key, {"leaf": None})
                n_leaves += 1
                if phone != SILENCE and key in data:
                    idx = np.arange(len(data[key][0]))
                    gain, side, q, mask = best_split(key, idx)
                    if gain >= min_gain:
                        heapq.heappush(heap, (-gain, counter, key, node, idx, side, q, mask))
                        counter += 1
        if n_leaves > max_leaves:
            raise ValueError(
                f"SenoneTree.build: max_leaves={max_leaves} is below the {n_leaves} untied "
                "(phone, state) roots; raise it"
            )
        while heap and n_leaves < max_leaves:
            _, _, key, node, idx, side, q, mask = heapq.heappop(heap)
            node.pop("leaf")
            node.update(side=side, question=names[q], yes={"leaf": None}, no={"leaf": None})
            n_leaves += 1
            for child, child_idx in ((node["yes"], idx[mask]), (node["no"], idx[~mask])):
                gain, c_side, c_q, c_mask = best_split(key, child_idx)
                if gain >= min_gain:
                    heapq.heappush(heap, (-gain, counter, key, child, child_idx, c_side, c_q, c_mask))
                    counter += 1

        # Number the leaves: silence first, then PHONES order, depth first (yes before no).
        next_id = [0]

        def number(node):
            if "leaf" in node:
                node["leaf"] = next_id[0]
                next_id[0] += 1
            else:
                number(node["yes"])
                number(node["no"])

        for phone in PHONES:
            for s in range(STATES):
                number(trees[f"{phone}/{s}"])
        settings = {
            "max_leaves": max_leaves,
            "min_count": min_count,
            "min_gain": min_gain,
            "frames": int(all_n),
            "triphone_states": len(stats.stats),
        }
        return cls(trees, questions, settings)

    def save(self, path):
        """Writes the tree as JSON (atomically)."""
        payload = {
            "format": "sbkd-senone-tree-1",
            "hash": self.hash,
            "num_senones": self.num_senones,
            "depth": self.depth,
            "settings": self.settings,
            "questions": {k: sorted(v) for k, v in self.questions.items()},
            "trees": self.trees,
        }
        atomic_write_text(path, json.dumps(payload, indent=1))

    @classmethod
    def load(cls, path):
        """Reads a tree written by :meth:`save`."""
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
        if payload.get("format") != "sbkd-senone-tree-1":
            raise ValueError(f"{path}: not a senone tree written by SenoneTree.save")
        return cls(payload["trees"], payload["questions"], payload.get("settings"))
