"""The unit types: one object per kind of unit that heads predict and unit LMs model.

A unit type says, in one place, everything the rest of the package needs to know about it:

- ``name``: the one name used everywhere: heads' ``unit_type``, unit-store streams
  (``{name}.units``, ``{name}.frame_to_position``, ``{name}.frame_labels``), batch keys
  (``{name}_units``, ``{name}_frame_to_position``, ``{name}_frame_labels``, and the teacher
  triple ``{name}_top_probs``, ``{name}_top_ids``, ``{name}_residual``), teacher caches
  (``caches/{name}_{split}``) and unit LMs (``lm/{name}``);
- ``needs``: the resources its ids are defined by (``tokenizer``, ``lexicon``, ``tree``), whose
  hashes make its :meth:`~UnitType.units_hash`;
- :meth:`~UnitType.vocab_size` and :meth:`~UnitType.text_to_ids`: text -> unit ids (what its LM
  reads);
- :meth:`~UnitType.streams`: its unit sequence and frame alignment from one utterance's phone
  alignment (:class:`AlignedUtterance`), for the unit store;
- ``lm_hparams``: the hparams file its unit LM trains with (``None``: no LM, so no teacher;
  its heads train on hard labels only).

The registry holds the package's three (``subword``, ``monophone``, ``senone``, in that
order); :func:`register_unit_type` adds one, and the alignment export, the prep chain, the
datasets, the Brain and the command line pick it up. A head for it is one yaml fragment: an
:class:`~sb_crossmodal_kd.nnet.heads.AuxiliaryHead` with ``unit_type: <name>``.

Example
-------
>>> from sb_crossmodal_kd.units.lexicon import Lexicon
>>> lexicon = Lexicon({"turn": [["T", "ER1", "N"]], "on": [["AA1", "N"]]}, name="toy")
>>> monophone = unit_type("monophone")
>>> monophone.text_to_ids("turn on", UnitResources(lexicon=lexicon))
[31, 12, 23, 1, 23]
>>> sorted(UNIT_TYPES)
['monophone', 'senone', 'subword']
>>> unit_type("phones")
Traceback (most recent call last):
...
KeyError: "unknown unit type 'phones': the registered ones are ['subword', 'monophone', ...
"""

import dataclasses
import os

import numpy as np

from sb_crossmodal_kd.alignment.units import subword_frame_positions, token_char_spans
from sb_crossmodal_kd.hparams import UNIT_LMS
from sb_crossmodal_kd.units.phones import PHONES
from sb_crossmodal_kd.units.senones import STATES, split_states

RESOURCES = ("tokenizer", "lexicon", "tree")
STREAM_FIELDS = ("units", "frame_to_position", "frame_labels")


@dataclasses.dataclass
class UnitResources:
    """What unit ids are defined by: a tokenizer, a lexicon, a senone tree (any may be absent).

    ``silence`` is the silence mode of phone sequences made from text (``"none"``, ``"edges"``,
    ``"between"``; the unit store's are ``"none"``).
    """

    tokenizer: object = None
    lexicon: object = None
    tree: object = None
    silence: str = "none"

    def hashes(self):
        """``{resource: hash or None}``, as a unit store's header records them."""
        return {name: getattr(getattr(self, name), "hash", None) for name in RESOURCES}


@dataclasses.dataclass
class AlignedUtterance:
    """One utterance's phone alignment, from which every unit type's streams derive.

    Arguments
    ---------
    phone_ids : array-like of int
        Text phone sequence (indices of ``PHONES``, no silence).
    feature_positions : array-like of int
        Position in ``phone_ids`` per 10 ms feature frame, ``-1`` for silence.
    n_frames : int
        Encoder frames of the utterance (``frame_rate.frames_for_samples(n_samples)``).
    frame_rate : FrameRate
        Front-end geometry (10 ms labels go to the encoder rate with its ``downsample``).
    text : str, optional
        The transcript (subwords and other text-defined units).
    word_times : list of (word, start_s, end_s), optional
        Aligned words of ``text``.
    mode : str
        ``"majority"`` or ``"centre"`` (see ``FrameRate.downsample``).
    """

    phone_ids: object
    feature_positions: object
    n_frames: int
    frame_rate: object
    text: str = None
    word_times: list = None
    mode: str = "majority"

    def downsample(self, labels):
        """10 ms labels -> encoder frames."""
        return self.frame_rate.downsample(labels, self.mode, self.n_frames)


def _labels(units, positions, silence):
    """Unit id per frame: ``units[position]``, ``silence`` (per frame or scalar) elsewhere."""
    units = np.asarray(units, dtype=np.int64)
    picked = units[np.maximum(positions, 0)] if len(units) else np.zeros_like(positions)
    return np.where(positions >= 0, picked, silence).astype(np.int32)


class UnitType:
    """A kind of unit; subclass it and :func:`register_unit_type` an instance to add one.

    Class attributes: ``name``; ``needs`` (resources defining the ids); ``stream_needs``
    (resources :meth:`streams` needs, default ``needs``); ``labels_silence`` (whether silence
    frames carry a unit of their own in ``frame_labels``, else ``-1``); ``uses_silence_mode``
    (whether the text's phone silence mode changes the ids); ``lm_hparams`` (the unit LM's
    hparams file, or ``None`` for a unit type without an LM).
    """

    name = None
    needs = ()
    stream_needs = None
    labels_silence = False
    uses_silence_mode = False
    lm_hparams = None

    def missing(self, resources, for_streams=False):
        """Names of the resources this unit type needs that ``resources`` lacks."""
        needs = self.needs if not for_streams or self.stream_needs is None else self.stream_needs
        return [need for need in needs if getattr(resources, need) is None]

    def vocab_size(self, resources):
        """Number of unit ids."""
        raise NotImplementedError

    def text_to_ids(self, text, resources, utterance_id=None):
        """Unit ids of ``text``; lexicon errors name ``utterance_id``."""
        raise NotImplementedError

    def streams(self, alignment, resources):
        """``{field: int32 array}`` for ``units``, ``frame_to_position``, ``frame_labels``."""
        raise NotImplementedError

    def units_hash(self, hashes, silence="none"):
        """The one string naming what defines the ids, from the resources' hashes.

        Unit LM exports and teacher cache headers record it; a unit store's header gives the
        same ``hashes``. A silence mode other than ``"none"`` is appended where it matters.
        """
        parts = [str(hashes.get(need)) for need in self.needs] or [self.name]
        if self.uses_silence_mode and silence != "none":
            parts.append(f"silence={silence}")
        return "/".join(parts)

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r})"


class SubwordUnits(UnitType):
    """Subword tokens of the tokenizer; a word's aligned time span is shared out over its
    tokens in proportion to their characters; silence frames have no subword (``-1``)."""

    name = "subword"
    needs = ("tokenizer",)
    lm_hparams = UNIT_LMS / "subword.yaml"

    def vocab_size(self, resources):
        return resources.tokenizer.vocab_size

    def text_to_ids(self, text, resources, utterance_id=None):
        return list(resources.tokenizer.encode(text))

    def streams(self, alignment, resources):
        if alignment.text is None or alignment.word_times is None:
            raise ValueError("subword streams need the alignment's text and word_times")
        tokenizer = resources.tokenizer
        ids = list(tokenizer.encode(alignment.text))
        positions = subword_frame_positions(
            tokenizer.decode(ids), alignment.word_times, token_char_spans(tokenizer, ids),
            alignment.n_frames, alignment.frame_rate.encoder_shift_s,
        )
        return {"units": np.asarray(ids, dtype=np.int32), "frame_to_position": positions,
                "frame_labels": _labels(ids, positions, -1)}


class MonophoneUnits(UnitType):
    """The lexicon's phones (``PHONES`` indices, no silence in the sequence); positions come
    straight from the alignment; silence frames are labelled with the silence phone (0)."""

    name = "monophone"
    needs = ("lexicon",)
    stream_needs = ()  # the phone alignment already holds the phone ids
    labels_silence = True
    uses_silence_mode = True
    lm_hparams = UNIT_LMS / "monophone.yaml"

    def vocab_size(self, resources):
        return len(PHONES)

    def text_to_ids(self, text, resources, utterance_id=None):
        return resources.lexicon.phone_ids(text, silence=resources.silence,
                                           utterance_id=utterance_id)

    def streams(self, alignment, resources):
        phone_ids = np.asarray(alignment.phone_ids, dtype=np.int64)
        positions = alignment.downsample(np.asarray(alignment.feature_positions, np.int64))
        return {"units": phone_ids.astype(np.int32), "frame_to_position": positions,
                "frame_labels": _labels(phone_ids, positions, 0)}


class SenoneUnits(UnitType):
    """Tied triphone states of the senone tree, 3 per phone; each aligned phone is split into
    3 equal state segments; silence frames have no position but carry the silence states'
    senones (0, 1, 2) as frame labels."""

    name = "senone"
    needs = ("lexicon", "tree")
    stream_needs = ("tree",)
    labels_silence = True
    uses_silence_mode = True
    lm_hparams = UNIT_LMS / "senone.yaml"

    def vocab_size(self, resources):
        return resources.tree.num_senones

    def text_to_ids(self, text, resources, utterance_id=None):
        phones = resources.lexicon.phones(text, silence=resources.silence,
                                          utterance_id=utterance_id)
        return resources.tree.senones(phones)

    def streams(self, alignment, resources):
        tree = resources.tree
        feature_positions = np.asarray(alignment.feature_positions, dtype=np.int64)
        phones = [PHONES[i] for i in alignment.phone_ids]
        units = np.asarray(tree.senones(phones), dtype=np.int64)
        _, state_positions = tree.frame_senones(phones, feature_positions)
        # Silence frames: the silence states, split over each silence run like a phone.
        silence_labels = np.full(len(feature_positions), -1, dtype=np.int64)
        is_sil = feature_positions < 0
        change = np.flatnonzero(np.diff(is_sil.astype(np.int8))) + 1
        for a, b in zip(np.r_[0, change], np.r_[change, len(is_sil)], strict=True):
            if b > a and is_sil[a]:
                silence_labels[a:b] = split_states(a, b, STATES)  # silence senones are 0, 1, 2
        positions = alignment.downsample(state_positions)
        silence_frames = alignment.downsample(silence_labels)
        labels = units if len(units) else np.full(1, -1)
        return {"units": units.astype(np.int32), "frame_to_position": positions,
                "frame_labels": _labels(labels, positions, np.maximum(silence_frames, 0))}


UNIT_TYPES = {}


def register_unit_type(unit):
    """Adds ``unit`` (a :class:`UnitType` instance) to the registry, under ``unit.name``.

    Returns it, so a module can write ``CHARACTER = register_unit_type(CharacterUnits())``.
    Registering a name twice replaces the earlier one.
    """
    if not isinstance(unit, UnitType) or not unit.name or "_" in unit.name or "." in unit.name:
        raise ValueError(f"register_unit_type: {unit!r} is not a UnitType with a name free of "
                         "'_' and '.' (batch keys are {name}_..., store streams {name}....)")
    UNIT_TYPES[unit.name] = unit
    return unit


def unregister_unit_type(name):
    """Removes a unit type from the registry (e.g. one a test registered)."""
    UNIT_TYPES.pop(name, None)


def unit_type(name):
    """The registered unit type called ``name``; a ``KeyError`` lists the registered ones."""
    try:
        return UNIT_TYPES[name]
    except KeyError:
        raise KeyError(f"unknown unit type {name!r}: the registered ones are "
                       f"{list(UNIT_TYPES)}") from None


def unit_type_names():
    """Names of the registered unit types, in registration order."""
    return list(UNIT_TYPES)


def lm_unit_types():
    """Names of the registered unit types that have a unit LM (hence a teacher cache)."""
    return [name for name, unit in UNIT_TYPES.items() if unit.lm_hparams is not None]


for _unit in (SubwordUnits(), MonophoneUnits(), SenoneUnits()):
    register_unit_type(_unit)


def unit_streams(alignment, resources):
    """Every registered unit type's store streams for one utterance.

    A unit type whose stream resources are absent (no tree: no senones; no tokenizer: no
    subwords) is left out.

    Arguments
    ---------
    alignment : AlignedUtterance
        The utterance's phone alignment.
    resources : UnitResources
        Tokenizer and tree (the lexicon is not needed: the alignment holds the phone ids).

    Returns
    -------
    dict
        Stream name (``{unit}.{field}``, and ``feature_positions``) -> ``int32`` array.
    """
    streams = {"feature_positions": np.asarray(alignment.feature_positions, dtype=np.int32)}
    for name, unit in UNIT_TYPES.items():
        if unit.missing(resources, for_streams=True):
            continue
        for field, values in unit.streams(alignment, resources).items():
            streams[f"{name}.{field}"] = np.asarray(values, dtype=np.int32)
    return streams


class TextUnits:
    """Text -> unit ids of one registered unit type, with the resources that define them.

    ``hash`` names everything that defines the ids (:meth:`UnitType.units_hash`), for the LM
    export and the teacher cache header.

    Arguments
    ---------
    unit_type : str
        A registered unit type (``"subword"``, ``"monophone"``, ``"senone"``, ...).
    tokenizer : object, optional
        A subword tokenizer with ``encode``, ``vocab_size`` and ``hash``.
    lexicon : Lexicon, optional
        For phone-based units.
    tree : SenoneTree, optional
        For senones.
    silence : str
        Silence mode of the phone sequence (``"none"``, ``"edges"``, ``"between"``).

    Example
    -------
    >>> from sb_crossmodal_kd.units.lexicon import Lexicon
    >>> lexicon = Lexicon({"turn": [["T", "ER1", "N"]], "on": [["AA1", "N"]]}, name="toy")
    >>> monophones = TextUnits("monophone", lexicon=lexicon)
    >>> monophones("turn on"), monophones.vocab_size
    ([31, 12, 23, 1, 23], 40)
    """

    def __init__(self, unit_type, tokenizer=None, lexicon=None, tree=None, silence="none"):
        self.unit = _registered(unit_type)
        self.resources = UnitResources(tokenizer, lexicon, tree, silence)
        missing = self.unit.missing(self.resources)
        if missing:
            raise ValueError(f"TextUnits({unit_type!r}) needs {', '.join(missing)}")
        self.unit_type = unit_type
        self.tokenizer, self.lexicon, self.tree, self.silence = tokenizer, lexicon, tree, silence

    @classmethod
    def from_files(cls, unit_type, tokenizer=None, tree=None, oov_policy="g2p", silence="none",
                   lexicon=None):
        """Builds the converter from paths, as the command line gives them; only the
        resources ``unit_type`` needs are loaded.

        Arguments
        ---------
        unit_type : str
            A registered unit type.
        tokenizer : str, optional
            A SentencePiece model file named ``<vocab_size>_<model_type>.model``
            (SpeechBrain's naming) or a transformers tokenizer folder.
        tree : str, optional
            A tree written by ``SenoneTree.save``.
        oov_policy : str
            Lexicon policy for out-of-vocabulary words (``"g2p"`` or ``"skip"``).
        silence : str
            Silence mode of phone sequences.
        lexicon : str, optional
            A lexicon file (:func:`~sb_crossmodal_kd.units.lexicon.read_lexicon` formats);
            default CMUdict.
        """
        needs = _registered(unit_type).needs
        loaded = {}
        if "tokenizer" in needs:
            if tokenizer is None:
                raise ValueError(f"{unit_type} units need a tokenizer (SentencePiece .model or "
                                 "folder)")
            loaded["tokenizer"] = _load_tokenizer(tokenizer)
        if "lexicon" in needs:
            from sb_crossmodal_kd.units.lexicon import Lexicon

            loaded["lexicon"] = Lexicon.load(lexicon, oov_policy=oov_policy)
        if "tree" in needs:
            if tree is None:
                raise ValueError(f"{unit_type} units need a tree file (SenoneTree.save JSON)")
            from sb_crossmodal_kd.units.senones import SenoneTree

            loaded["tree"] = SenoneTree.load(tree)
        return cls(unit_type, silence=silence, **loaded)

    @property
    def vocab_size(self):
        """Number of unit ids."""
        return self.unit.vocab_size(self.resources)

    @property
    def hash(self):
        """What defines the unit ids, as one string (see :meth:`UnitType.units_hash`)."""
        return self.unit.units_hash(self.resources.hashes(), self.silence)

    def __call__(self, text, utterance_id=None):
        """Unit ids of ``text``; lexicon errors name ``utterance_id``."""
        return self.unit.text_to_ids(text, self.resources, utterance_id)


def _registered(name):
    try:
        return unit_type(name)
    except KeyError as error:
        raise ValueError(error.args[0]) from None


def _load_tokenizer(path):
    if os.path.isdir(path):
        from sb_crossmodal_kd.units.subwords import PretrainedTokenizerUnits

        return PretrainedTokenizerUnits(path)
    from sb_crossmodal_kd.units.subwords import SentencePieceUnits

    stem = os.path.basename(path).removesuffix(".model")
    size, _, model_type = stem.partition("_")
    if not size.isdigit() or not model_type or not os.path.isfile(path):
        raise ValueError(
            f"{path!r}: expected an existing SentencePiece model named "
            "<vocab_size>_<model_type>.model (e.g. 128_unigram.model)"
        )
    return SentencePieceUnits(os.path.dirname(path) or ".", int(size), model_type=model_type)


def units_hash(unit_type, tokenizer=None, lexicon=None, tree=None, silence="none"):
    """:meth:`UnitType.units_hash` of a registered unit type, from the resources' hashes.

    Example
    -------
    >>> units_hash("senone", lexicon="cmudict:ab", tree="tree:cd")
    'cmudict:ab/tree:cd'
    """
    hashes = {"tokenizer": tokenizer, "lexicon": lexicon, "tree": tree}
    return _registered(unit_type).units_hash(hashes, silence)
