"""The data chain of hierarchical distillation, as library steps, and the KD recipe's datasets.

Two entry points run the same chain, each step skipped when its output is complete (every
output is a file with a header saying what it was built from):

- :func:`prepare_kd_data` starts by making the SynthCommands corpus (what ``sbkd ablation``
  runs);
- :func:`prepare_kd_data_from_manifests` starts from any corpus's SpeechBrain manifests
  (CSV or JSON; ``train``, ``valid``, ``test``) and a text file for the unit LMs: what the
  ``recipes/Manifest`` and ``recipes/LibriSpeech`` recipes (and any other corpus) use.

The steps:

1. corpus: :func:`~sb_crossmodal_kd.data.corpus.make_corpus` (SynthCommands), or the given
   manifests, checked and written as CSVs to ``prep_dir/data/{split}.csv`` with the LM text;
2. subword tokenizer: SentencePiece on the train transcripts, as the baseline recipe's (first,
   so that a ``vocab_size`` the transcripts cannot fill is known in seconds: fitted to the
   largest they can, or with ``fit_vocab_size: False`` refused naming it);
3. lexicon and forced alignment: the ``lexicon`` setting's file, or CMUdict, with the
   letter-to-sound fallback (OOV report), a flat-start
   :class:`~sb_crossmodal_kd.alignment.forced.PhoneAligner` trained on the train split,
   every split that needs units aligned;
4. senone tree: :class:`~sb_crossmodal_kd.units.senones.SenoneTree` from the train split's
   alignments and the aligner's features;
5. one :class:`~sb_crossmodal_kd.units.store.UnitStore` per split (phones, senones, subwords
   with their encoder-frame alignments);
6. three unit LMs on the text-only corpus (``lm_text``), each trained by
   :func:`~sb_crossmodal_kd.teachers.lm_training.train_unit_lm` on its file of
   :data:`~sb_crossmodal_kd.hparams.UNIT_LMS` in a worker process, with the tokenizer and tree
   above so their unit ids are the store's;
7. one teacher cache per unit type and split, from the store's unit sequences, holding the
   teacher's distribution at the temperature ``settings["teacher_tau"][unit_type]`` (the
   KD recipe's heads must use the same ``tau``: ``base.yaml``'s ``<unit>_tau``).

Layout of ``prep_dir`` (read by the KD conditions' ``base.yaml``)::

    prep.json                    settings, paths and per-step seconds (refuses other settings)
    data/{split}.csv             (from manifests only) the checked manifests, the KD
                                 recipe's data_folder;  lm_text/{train,valid}.txt its LM text
    align/aligner.pt             the phone model;  align/{split}_phone_alignments.json
    align/train_oov.txt          out-of-vocabulary words of the train split and their fallback
    senone_tree.json
    tokenizer/<V>_unigram.model
    units/{split}.units
    lm/{subword,monophone,senone}/   unit-LM outputs (lm/ is the teacher, results.json)
    caches/{unit_type}_{split}/  top-k teacher distributions

:func:`add_kd_items` is the KD recipe's ``dataset_pipelines`` hook: it keeps, in every
condition, the train utterances the unit store holds, and gives them the unit sequences,
alignments and teacher triples that the chosen heads and label interpolation need (nothing
for conditions that need none).
"""

import copy
import json
import logging
import os
import random
import time
from pathlib import Path

from sb_crossmodal_kd.hparams import UNIT_LMS
from sb_crossmodal_kd.io import atomic_write_json, atomic_write_text, refuse_other_settings
from sb_crossmodal_kd.teachers.lm_training import train_unit_lm

logger = logging.getLogger(__name__)

__all__ = ["PREP_DEFAULTS", "prep_settings", "prep_settings_file", "prepare_kd_data",
           "prepare_kd_data_from_manifests", "add_kd_items", "senone_count", "prepared_setting",
           "teacher_unit_types", "STEPS"]


UNIT_TYPES = ("subword", "monophone", "senone")
# The chain's steps in order (prep.json's "steps"); training with no teacher needs the first four.
STEPS = ("corpus", "tokenizer", "lexicon_alignment", "senone_tree", "unit_stores", "unit_lms",
         "teacher_caches")
MANIFEST_SPLITS = ("train", "valid", "test")  # what the KD recipe reads
SAMPLE_RATE = 16000  # the aligner's features and the KD recipe's front end
LM_SAMPLE_SEED = 1986  # which LM sentences are kept when max_train_sentences limits them

# Sized for `sbkd demo` (five conditions in 15 minutes on 2 CPU cores; measured 14.1 min in
# all): see the KD README.
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
    # Temperature of each teacher cache; the KD recipe's heads must use the same tau.
    "teacher_tau": {"subword": 1.0, "monophone": 1.0, "senone": 1.0},
    "splits": ["train"],  # the Brain reads units and teachers in training only
}
# Settings added since data was first prepared, with the value older data was built with:
# a prep.json without them describes data made that way, so it is not refused.
_OLDER_DATA_SETTINGS = {"teacher_tau": {"subword": 1.0, "monophone": 1.0, "senone": 1.0},
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
    for key, value in overrides.items():
        if key not in settings:
            raise KeyError(f"Unknown prep setting {key!r}; known: {sorted(settings)}")
        if key == "teacher_tau" and isinstance(value, int | float):
            value = dict.fromkeys(UNIT_TYPES, value)
        if isinstance(settings[key], dict) and isinstance(value, dict):
            settings[key].update(value)
        else:
            settings[key] = value
    settings["splits"] = sorted(set(settings["splits"]) | {"train"})
    taus = settings["teacher_tau"]
    if not isinstance(taus, dict) or set(taus) != set(UNIT_TYPES):
        raise KeyError(f"prep setting teacher_tau is {taus!r}: give a number, or numbers by "
                       f"unit type of {list(UNIT_TYPES)}")
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


def prepare_kd_data(data_dir, prep_dir, settings=None, progress=False, device="cpu", jobs=1,
                    through=None, lm_cores=None):
    """Runs the chain on SynthCommands (corpus -> ... -> teacher caches), skipping finished steps.

    Arguments
    ---------
    data_dir : str or Path
        Corpus folder (made here if absent; an existing one must have the same settings).
    prep_dir : str or Path
        Folder of everything else (layout in the module docstring).
    settings : dict, optional
        From :func:`prep_settings` (default: :data:`PREP_DEFAULTS`).
    progress : bool
        Show progress bars.
    device : str
        Where the unit LMs train and the teachers fill the caches (the aligner uses the CPU).
    jobs : int
        Processes for the corpus synthesis (its output does not depend on it).
    through : str, optional
        Stop after this step (one of :data:`STEPS`), e.g. ``"unit_stores"``: what training
        without teachers needs. A later call continues from there.
    lm_cores : int, optional
        CPU cores the unit LMs may use, e.g. those that runs training meanwhile leave free:
        at most that many LM processes, the cores shared among them (default: one process
        per LM, all cores shared).

    Returns
    -------
    dict
        ``prep.json``'s content: ``settings``, ``steps`` (seconds, this run's work only) and
        ``outputs`` (``n_senones``, ``tokenizer_hash``, LM ``valid_ppl`` per unit type, ...).
    """
    from sb_crossmodal_kd.data.corpus import make_corpus

    _stops_after("corpus", through)  # an unknown step name fails before any work
    settings = settings or prep_settings()
    _lexicon_file(settings)  # so does a missing lexicon file
    data_dir, prep_dir = Path(data_dir).resolve(), Path(prep_dir).resolve()
    prep_dir.mkdir(parents=True, exist_ok=True)
    record = _Record(prep_dir, settings, {"data_folder": str(data_dir)})

    start = time.time()
    manifests = make_corpus(data_dir, progress=progress, jobs=jobs, **settings["corpus"])
    record.step("corpus", time.time() - start)
    if _stops_after("corpus", through):
        return record.data
    lm_texts = {"train": manifests["lm_train"], "valid": manifests["lm_valid"]}
    return _chain(prep_dir, record, manifests, lm_texts, settings, progress, device, through,
                  lm_cores)


def prepare_kd_data_from_manifests(
    manifests,
    prep_dir,
    lm_text=None,
    settings=None,
    lm_valid_text=None,
    replacements=None,
    progress=False,
    device="cpu",
    through=None,
):
    """Runs the chain on any corpus given by its manifests, skipping finished steps.

    Arguments
    ---------
    manifests : dict
        ``{"train": path, "valid": path, "test": path, ...}``: SpeechBrain CSV or JSON
        manifests with ``ID, duration, wav, wrd`` (extra columns are kept), 16 kHz audio.
        Every row is checked first; a bad one stops the run naming file, line and utterance.
        Further splits (e.g. ``test_other``) are checked and written like the others.
    prep_dir : str or Path
        Folder of everything (layout in the module docstring). The KD recipe then reads
        ``--data_folder PREP/data --prep_folder PREP``.
    lm_text : str or Path, optional
        Text for the unit LMs, one sentence per line, written as the transcripts are (same
        case and punctuation: it goes through the same lexicon and tokenizer). With
        ``settings["lm"]["max_train_sentences"]`` a seeded uniform sample of that many lines
        is used (one pass over the file). ``None``: the train transcripts (logged).
    settings : dict, optional
        From :func:`prep_settings`; ``corpus`` is ignored (default: :data:`PREP_DEFAULTS`).
    lm_valid_text : str or Path, optional
        Held-out text for the LMs' perplexity; ``None``: the valid transcripts.
    replacements : dict, optional
        Manifest placeholders, e.g. ``{"data_root": "/data"}`` (``$data_root`` in CSV,
        ``{data_root}`` in JSON).
    progress : bool
        Show progress bars.
    device : str
        Where the unit LMs train and the teachers fill the caches (the aligner uses the CPU).
    through : str, optional
        Stop after this step, as in :func:`prepare_kd_data` (the first is ``"manifests"``).

    Returns
    -------
    dict
        ``prep.json``'s content, as :func:`prepare_kd_data` returns it.
    """
    if through != "manifests":
        _stops_after("corpus", through)  # an unknown step name fails before any work
    missing = [split for split in MANIFEST_SPLITS if split not in manifests]
    if missing:
        raise ValueError(
            f"manifests lacks {', '.join(missing)}: the KD recipe trains on train, picks "
            f"checkpoints on valid and reports test; give all three (got {sorted(manifests)})"
        )
    settings = {k: v for k, v in (settings or prep_settings()).items() if k != "corpus"}
    _lexicon_file(settings)  # a missing lexicon file fails before any work
    unknown = [split for split in settings["splits"] if split not in manifests]
    if unknown:
        raise ValueError(f"settings['splits'] names {', '.join(unknown)}, which manifests lacks")
    prep_dir = Path(prep_dir).resolve()
    prep_dir.mkdir(parents=True, exist_ok=True)
    source = {
        "manifests": {split: str(Path(path).resolve()) for split, path in manifests.items()},
        "lm_text": str(Path(lm_text).resolve()) if lm_text else None,
        "lm_valid_text": str(Path(lm_valid_text).resolve()) if lm_valid_text else None,
    }
    record = _Record(prep_dir, settings, source)

    start = time.time()
    written = {
        split: _import_manifest(Path(path), prep_dir / "data" / f"{split}.csv", replacements)
        for split, path in manifests.items()
    }
    lm_texts = _lm_texts(prep_dir / "lm_text", lm_text, lm_valid_text, written,
                         settings["lm"].get("max_train_sentences"))
    record.step("manifests", time.time() - start)
    if through == "manifests":
        return record.data
    return _chain(prep_dir, record, written, lm_texts, settings, progress, device, through)


def _import_manifest(source, target, replacements):
    """Checks ``source`` (CSV or JSON) and writes it as the SpeechBrain CSV ``target``; skipped
    while ``source`` is unchanged (checking every audio header of a large corpus takes long).
    Audio at another rate than :data:`SAMPLE_RATE` stays as it is: every reader resamples it
    on load (:func:`~sb_crossmodal_kd.data.audio.load_audio`)."""
    from sb_crossmodal_kd.data.manifest import check_manifest, write_manifest_csv

    done = target.with_name(target.name + ".source")
    if source.is_file():
        status = source.stat()
        stamp = json.dumps({"source": str(source), "size": status.st_size,
                            "mtime_ns": status.st_mtime_ns,
                            "replacements": {k: str(v) for k, v in (replacements or {}).items()}})
        if target.is_file() and done.is_file() and done.read_text() == stamp:
            return target
    rows = check_manifest(source, replacements=replacements, sample_rate=SAMPLE_RATE)
    write_manifest_csv(target, rows)
    atomic_write_text(done, stamp)
    return target


def _transcripts(manifest):
    from sb_crossmodal_kd.alignment.corpus import read_manifest

    return [row["wrd"].strip() for row in read_manifest(manifest)]


def _lm_texts(folder, lm_text, lm_valid_text, manifests, max_sentences):
    """``{"train": path, "valid": path}`` of the unit LMs' text (see
    :func:`prepare_kd_data_from_manifests`)."""
    texts = {"train": folder / "train.txt", "valid": folder / "valid.txt"}
    if all(path.is_file() for path in texts.values()):  # prep.json vouches for their source
        return texts
    if lm_text is None:
        logger.info("No LM text given: the unit LMs train on the %s transcripts only, so the "
                    "teachers know no more text than the acoustic model", manifests["train"])
        sentences = _transcripts(manifests["train"])
    else:
        sentences = _sample_lines(Path(lm_text), max_sentences)
    atomic_write_text(texts["train"], "\n".join(sentences) + "\n")
    if lm_valid_text is None:
        sentences = _transcripts(manifests["valid"])
    else:
        sentences = _sample_lines(Path(lm_valid_text), None)
    atomic_write_text(texts["valid"], "\n".join(sentences) + "\n")
    return texts


def _sample_lines(path, n):
    """The non-empty lines of ``path``, or a seeded uniform sample of ``n`` of them in file
    order (reservoir sampling: one pass, ``n`` lines in memory, for multi-GB LM corpora).

    Example
    -------
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "lm.txt"
    >>> _ = path.write_text("".join(f"S{i}\\n" for i in range(100)))
    >>> sample = _sample_lines(path, 5)
    >>> len(sample), sample == sorted(sample, key=lambda s: int(s[1:]))
    (5, True)
    >>> len(_sample_lines(path, None)), _sample_lines(path, 5) == sample
    (100, True)
    """
    if not path.is_file():
        raise FileNotFoundError(f"LM text {path} not found (one sentence per line)")
    rng = random.Random(LM_SAMPLE_SEED)
    kept, seen = [], 0
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            text = line.strip()
            if not text:
                continue
            if n is None or len(kept) < n:
                kept.append((seen, text))
            else:
                slot = rng.randrange(seen + 1)
                if slot < n:
                    kept[slot] = (seen, text)
            seen += 1
    if not kept:
        raise ValueError(f"LM text {path} has no sentences (one sentence per line)")
    return [text for _, text in sorted(kept)]


def _chain(prep_dir, record, manifests, lm_texts, settings, progress, device, through=None,
           lm_cores=None):
    """The steps after the corpus (module docstring), on CSV ``manifests`` and ``lm_texts``;
    returns after step ``through`` when it is given."""
    from sb_crossmodal_kd.units.lexicon import Lexicon

    start = time.time()
    tokenizer = _tokenizer(prep_dir / "tokenizer", manifests["train"], settings["vocab_size"],
                           settings["fit_vocab_size"])
    record.step("tokenizer", time.time() - start, tokenizer=tokenizer.hash,
                vocab_size=tokenizer.vocab_size)
    if _stops_after("tokenizer", through):
        return record.data

    start = time.time()
    lexicon = Lexicon.load(_lexicon_file(settings), oov_policy=settings["oov_policy"])
    aligner = _aligner(prep_dir / "align", manifests["train"], lexicon, settings, progress)
    alignments = {
        split: _alignments(prep_dir / "align", split, manifests[split], aligner, lexicon,
                           progress)
        for split in settings["splits"]
    }
    record.step("lexicon_alignment", time.time() - start, lexicon=lexicon.hash)
    if _stops_after("lexicon_alignment", through):
        return record.data

    start = time.time()
    tree = _tree(prep_dir / "senone_tree.json", alignments["train"], manifests["train"], aligner,
                 settings["tree"], progress)
    record.step("senone_tree", time.time() - start, n_senones=tree.num_senones, tree=tree.hash)
    if _stops_after("senone_tree", through):
        return record.data

    start = time.time()
    stores = {
        split: _unit_store(prep_dir / "units" / f"{split}.units", alignments[split],
                           manifests[split], lexicon, tree, tokenizer, progress)
        for split in settings["splits"]
    }
    record.step("unit_stores", time.time() - start,
                unit_stores={split: str(path) for split, path in stores.items()})
    if _stops_after("unit_stores", through):
        return record.data

    start = time.time()
    lms = _unit_lms(prep_dir, lm_texts, settings, tokenizer.vocab_size, device, lm_cores)
    record.step("unit_lms", time.time() - start,
                lm_valid_ppl={unit: lm["valid_ppl"] for unit, lm in lms.items()},
                lm_valid_ppl_curve={unit: lm.get("valid_ppl_curve", []) for unit, lm in lms.items()})
    if _stops_after("unit_lms", through):
        return record.data

    start = time.time()
    caches = {
        unit: {
            split: str(_teacher_cache(prep_dir, unit, split, stores[split], settings, device,
                                      progress))
            for split in settings["splits"]
        }
        for unit in UNIT_TYPES
    }
    from sb_crossmodal_kd.teachers.cache import TeacherCache

    # How far each teacher's targets are from one-hot, on the positions the heads train on.
    statistics = {unit: TeacherCache(caches[unit]["train"]).statistics() for unit in UNIT_TYPES}
    record.step("teacher_caches", time.time() - start, teacher_caches=caches,
                teacher_statistics=statistics)
    return record.data


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


def _stops_after(step, through):
    """Whether a chain asked to stop after step ``through`` (None: run all) ends at ``step``."""
    if through is None:
        return False
    if through not in STEPS:
        raise ValueError(f"Unknown step {through!r}; the steps are {', '.join(STEPS)}")
    return STEPS.index(through) <= STEPS.index(step)


def _aligner(folder, train_manifest, lexicon, settings, progress):
    from sb_crossmodal_kd.alignment.corpus import read_manifest
    from sb_crossmodal_kd.alignment.forced import AlignerSettings, PhoneAligner
    from sb_crossmodal_kd.units.lexicon import oov_report

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "aligner.pt"
    if path.is_file():
        return PhoneAligner.load(path, lexicon)
    rows = read_manifest(train_manifest)
    report = oov_report(lexicon, [(r["ID"], r["wrd"]) for r in rows], folder / "train_oov.txt")
    logger.info("train OOV rate %.4f (%d types, fallback: %s)", report["oov_rate"],
                report["oov_types"], settings["oov_policy"])
    aligner = PhoneAligner(lexicon, AlignerSettings(**settings["aligner"]))
    rows = rows[: settings["aligner_utterances"]]
    aligner.train([(r["ID"], r["wav"], r["wrd"]) for r in rows], progress=progress)
    aligner.save(path)
    return aligner


def _alignments(folder, split, manifest, aligner, lexicon, progress):
    from sb_crossmodal_kd.alignment.corpus import (
        align_manifest,
        load_alignments,
        read_manifest,
        save_alignments,
    )

    path = folder / f"{split}_phone_alignments.json"
    if not path.is_file():
        found, report = align_manifest(aligner, read_manifest(manifest), progress=progress)
        if report["skipped"]:
            logger.warning("%s: %d utterances not aligned, e.g. %s", split,
                           len(report["skipped"]), report["skipped"][0])
        header = {"lexicon": lexicon.hash, "manifest": str(manifest),
                  "aligner": aligner.state()["settings"], "report": report}
        save_alignments(path, found, header)
    return load_alignments(path, lexicon.hash)[1]


def _tree(path, alignments, manifest, aligner, tree_settings, progress):
    from sb_crossmodal_kd.alignment.corpus import read_manifest, tree_statistics
    from sb_crossmodal_kd.units.senones import SenoneTree

    if path.is_file():
        return SenoneTree.load(path)
    stats = tree_statistics(alignments, read_manifest(manifest), aligner.features,
                            aligner.settings.frame_rate.sample_rate,
                            progress=progress)
    tree = SenoneTree.build(stats, **tree_settings)
    tree.save(path)
    return tree


def _tokenizer(folder, train_manifest, vocab_size, fit=False):
    """The SentencePiece units of ``folder`` (trained there once); with ``fit``, a
    ``vocab_size`` the transcripts cannot make becomes the largest they can (a warning says
    so), else it is refused naming that size."""
    from sb_crossmodal_kd.units.subwords import SentencePieceUnits

    # The baseline recipe's tokenizer (same trainer, text and settings): the CTC output, the
    # subword store and the subword LM all use this one model.
    try:
        return SentencePieceUnits(str(folder), vocab_size, csv_file=str(train_manifest))
    except RuntimeError as error:
        import re

        most = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)",
                         str(error))
        if most is None:
            raise
        largest = int(most.group(1))
        if not fit:
            raise ValueError(
                f"vocab_size {vocab_size} is more subword pieces than the train transcripts of "
                f"{train_manifest} can make (at most {largest}): set the prep setting "
                f"vocab_size to {largest} or less (or fit_vocab_size: true)"
            ) from None
    logger.warning("vocab_size %d is more subword pieces than the train transcripts of %s can "
                   "make: the tokenizer has %d (the largest they can; the KD recipe reads it "
                   "from prep.json)", vocab_size, train_manifest, largest)
    return SentencePieceUnits(str(folder), largest, csv_file=str(train_manifest))


def _unit_store(path, alignments, manifest, lexicon, tree, tokenizer, progress):
    from sb_crossmodal_kd.alignment.corpus import export_units, read_manifest
    from sb_crossmodal_kd.units.store import UnitStore, UnitStoreMismatchError

    expect = {"lexicon": lexicon.hash, "tokenizer": tokenizer.hash, "tree": tree.hash}
    if path.is_file():
        try:
            UnitStore(path, expect=expect)
            return path
        except UnitStoreMismatchError as error:  # an upstream step was rebuilt
            logger.warning("%s; rebuilding it", error)
    path.parent.mkdir(parents=True, exist_ok=True)
    export_units(path, alignments, read_manifest(manifest), lexicon.hash, tree, tokenizer,
                 progress=progress)
    return path


def _unit_lms(prep_dir, lm_texts, settings, vocab_size, device, cores=None):
    """Trains the three unit LMs in worker processes, side by side (most of a small LM's time
    is start-up, and one process per LM keeps their torch threads apart), or at most
    ``cores`` processes at a time when it is given."""
    from sb_crossmodal_kd.workers import process_pool

    todo = {}
    for unit in UNIT_TYPES:
        folder = prep_dir / "lm" / unit
        if (folder / "results.json").is_file() and (folder / "lm" / "hyperparams.yaml").is_file():
            continue
        text = {split: Path(path).resolve() for split, path in lm_texts.items()}
        overrides = {"data_folder": str(text["train"].parent), "train_text": str(text["train"]),
                     "valid_text": str(text["valid"]), "output_folder": str(folder),
                     **settings["lm"]}
        if unit == "subword":
            overrides.update(tokenizer_dir=str(prep_dir / "tokenizer"),
                             vocab_size=vocab_size)
        if unit == "senone":
            overrides["tree_file"] = str(prep_dir / "senone_tree.json")
        if unit != "subword" and _lexicon_file(settings) is not None:
            overrides["lexicon_file"] = str(_lexicon_file(settings))
        todo[unit] = (str(UNIT_LMS / f"{unit}.yaml"), overrides, {"device": device})
    if todo:
        # One share of the cores each: oversubscribed torch threads made every epoch several
        # times slower (a user's OMP_NUM_THREADS wins).
        workers = len(todo) if cores is None else max(1, min(len(todo), cores))
        threads = int(os.environ.get("OMP_NUM_THREADS")
                      or max(1, (cores or os.cpu_count() or 1) // workers))
        with process_pool(workers, threads) as pool:
            futures = {unit: pool.submit(train_unit_lm, *args) for unit, args in todo.items()}
            failed = []
            for unit, future in futures.items():
                try:
                    future.result()
                except Exception as error:  # noqa: BLE001 (each LM's failure is reported)
                    failed.append(f"{unit} ({type(error).__name__}: {error}; see "
                                  f"{prep_dir / 'lm' / unit / 'log.txt'})")
        if failed:
            raise RuntimeError(f"Training the unit LM failed for: {'; '.join(failed)}")
    return {unit: json.loads((prep_dir / "lm" / unit / "results.json").read_text())
            for unit in UNIT_TYPES}


def _teacher_cache(prep_dir, unit, split, store, settings, device, progress):
    from sb_crossmodal_kd.teachers import load_teacher
    from sb_crossmodal_kd.teachers.cache import build_cache, utterances_from_unit_store

    folder = prep_dir / "caches" / f"{unit}_{split}"
    header = folder / "header.json"
    if header.is_file() and json.loads(header.read_text()).get("complete"):
        return folder
    utterances, units_hash = utterances_from_unit_store(store, unit)
    teacher = load_teacher(prep_dir / "lm" / unit / "lm")
    build_cache(teacher, utterances, folder, k=settings["cache_k"],
                tau=settings["teacher_tau"][unit], unit_type=unit, tokenizer_hash=units_hash,
                device=device, progress=progress)
    return folder


def _objective(hparams):
    """The condition's objective, or the default the Brain uses without one."""
    from sb_crossmodal_kd.losses import DistillationObjective

    return hparams.get("distillation") or DistillationObjective()


def kd_unit_types(hparams):
    """Unit types the condition's heads and label interpolation read (sorted)."""
    return _objective(hparams).required_unit_types(hparams["modules"].get("auxiliary_heads"))


def teacher_unit_types(hparams):
    """Unit types whose teacher cache the condition reads (sorted; empty: no teacher)."""
    return _objective(hparams).teacher_unit_types(hparams["modules"].get("auxiliary_heads"))


def add_kd_items(datasets, hparams):
    """The KD recipe's ``dataset_pipelines`` hook (called by ``experiment.asr_datasets``).

    With a unit store (``hparams["unit_stores"]["train"]``), every condition, the AM alone
    included, trains only on the utterances the store holds (the aligner may refuse some),
    so all conditions of a study see the same train set; how many were left out is logged.
    Then, for every unit type in :func:`kd_unit_types`, ``datasets["train"]`` gets the units
    pipeline (sequences and frame alignments from the store), and for those whose teacher
    the objective reads
    (:meth:`~sb_crossmodal_kd.losses.DistillationObjective.teacher_unit_types`: heads with
    ``alpha > 0``, label interpolation with ``lambda > 0``) the teacher triples of
    ``hparams["teacher_caches"]``. Only those caches are opened: an entry is a
    :class:`~sb_crossmodal_kd.teachers.cache.TeacherCache` or a callable that opens one
    (``base.yaml``'s ``!name:`` entries), and an opened one replaces its entry in
    ``hparams``, where the Brain finds it. A head whose ``tau`` differs from its cache's
    temperature is refused here, before training
    (:func:`~sb_crossmodal_kd.kd_brain.check_teacher_temperatures`). Valid and test stay
    plain: evaluation is the AM alone.
    """
    from sb_crossmodal_kd.kd_brain import check_teacher_temperatures, teacher_items
    from sb_crossmodal_kd.units.pipeline import add_unit_pipelines, unit_keys
    from sb_crossmodal_kd.units.store import UnitStore

    heads = hparams["modules"].get("auxiliary_heads")
    objective = _objective(hparams)
    unit_types = objective.required_unit_types(heads)
    store_path = (hparams.get("unit_stores") or {}).get("train")
    if store_path is None:
        if unit_types:
            raise KeyError(
                f"The condition reads {unit_types} units but hparams has no unit_stores: "
                "{train: ...} (the train split's unit store, e.g. PREP/units/train.units): "
                "add it, or drop the heads / label interpolation that need units"
            )
        return
    store = UnitStore(store_path)
    train = datasets["train"]
    kept = train.filtered_sorted(key_test={"id": lambda utt_id: utt_id in store})
    if len(kept) < len(train):
        logger.warning("%d of %d train utterances have no units in %s (not aligned): left out "
                       "of training, in every condition", len(train) - len(kept), len(train),
                       store.path)
    datasets["train"] = kept
    if not unit_types:
        return
    add_unit_pipelines([kept], [store], unit_types=unit_types)
    teacher_units = objective.teacher_unit_types(heads)
    caches = hparams.get("teacher_caches") or {}
    missing = [unit for unit in teacher_units if unit not in caches]
    if missing:
        raise KeyError(f"hparams teacher_caches has no cache for {missing}: the heads with "
                       "alpha > 0 or label interpolation with lambda > 0 distill from them")
    for unit in teacher_units:
        if callable(caches[unit]):  # a factory (base.yaml's !name:): open it now
            caches[unit] = caches[unit]()
    opened = {unit: caches[unit] for unit in teacher_units}
    check_teacher_temperatures(heads, opened)
    items, teacher_keys = teacher_items(opened)
    for item in items:
        kept.add_dynamic_item(item)
    # Keep the keys the split already gives (sig, or feats when features are cached).
    kept.set_output_keys([*kept.pipeline.output_mapping, *unit_keys(unit_types), *teacher_keys])
