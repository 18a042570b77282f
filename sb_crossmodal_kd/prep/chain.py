"""The data chain of hierarchical distillation: its two entry points, running the steps in order.

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
5. one :class:`~sb_crossmodal_kd.units.store.UnitStore` per split (every registered unit type
   of :mod:`sb_crossmodal_kd.units.types`: subwords, monophones, senones, ... with their
   encoder-frame alignments);
6. one unit LM per unit type that has one, on the text-only corpus (``lm_text``), each trained
   by :func:`~sb_crossmodal_kd.teachers.lm_training.train_unit_lm` on its unit type's
   ``lm_hparams`` in a worker process, with the tokenizer and tree above so their unit ids
   are the store's;
7. one teacher cache per unit type and split, from the store's unit sequences, holding the
   teacher's distribution at the temperature ``settings["teacher_tau"][unit_type]`` (the
   KD recipe's heads must use the same ``tau``: ``base.yaml``'s ``<unit>_tau``).

The phone model's re-alignments, alignment, tree statistics and unit stores run shard by shard
(:mod:`~sb_crossmodal_kd.alignment.sharded`) in ``jobs`` processes (started once for the
whole chain: :func:`~sb_crossmodal_kd.workers.shared_workers`), and under ``torchrun``
over the ranks (each rank its shards, rank 0 merging); so do the teacher caches
(:func:`~sb_crossmodal_kd.teachers.cache.build_cache`: each rank writes its shards, rank 0
the header). The other steps run on rank 0 while the other ranks wait, then load what it
made. No output depends on ``jobs`` or the number of ranks.

Layout of ``prep_dir`` (read by the KD conditions' ``base.yaml``)::

    prep.json                    settings, paths and per-step seconds (refuses other settings)
    data/{split}.csv             (from manifests only) the checked manifests, the KD
                                 recipe's data_folder;  lm_text/{train,valid}.txt its LM text
    align/aligner.pt             the phone model;  align/{split}_phone_alignments.json
    align/{split}_shards/        the same alignments, one file per 256 manifest rows
    align/train_oov.txt          out-of-vocabulary words of the train split and their fallback
    senone_tree.json
    tokenizer/<V>_unigram.model
    units/{split}.units
    lm/{unit_type}/              unit-LM outputs (lm/ is the teacher, results.json)
    caches/{unit_type}_{split}/  top-k teacher distributions
"""

import time
from pathlib import Path

from sb_crossmodal_kd.distributed import main_first, rank
from sb_crossmodal_kd.prep.lm_text import _lm_texts
from sb_crossmodal_kd.prep.manifests import MANIFEST_SPLITS, _import_manifest
from sb_crossmodal_kd.prep.record import prep_record
from sb_crossmodal_kd.prep.settings import _lexicon_file, prep_settings
from sb_crossmodal_kd.prep.steps import (
    _aligner,
    _alignments,
    _teacher_cache,
    _tokenizer,
    _tree,
    _unit_store,
)
from sb_crossmodal_kd.prep.unit_lms import _unit_lms
from sb_crossmodal_kd.sharding import check_jobs
from sb_crossmodal_kd.units.types import lm_unit_types
from sb_crossmodal_kd.workers import shared_workers

__all__ = ["STEPS", "prepare_kd_data", "prepare_kd_data_from_manifests"]


# The chain's steps in order (prep.json's "steps"); training with no teacher needs the first four.
STEPS = ("corpus", "tokenizer", "lexicon_alignment", "senone_tree", "unit_stores", "unit_lms",
         "teacher_caches")


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
        Where the phone model trains and aligns, the unit LMs train and the teachers fill the
        caches (under ``torchrun``, ``"cuda"`` is each rank's own GPU).
    jobs : int
        Processes for the corpus synthesis and the shards of alignment, tree statistics, unit
        stores and teacher caches (no output depends on it). Under ``torchrun`` each rank takes its shards
        (``i % world_size == rank``) in ``jobs`` processes.
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
    check_jobs(jobs)
    settings = settings or prep_settings()
    _lexicon_file(settings)  # so does a missing lexicon file
    data_dir, prep_dir = Path(data_dir).resolve(), Path(prep_dir).resolve()
    prep_dir.mkdir(parents=True, exist_ok=True)
    record = main_first(prep_record, prep_dir, settings, {"data_folder": str(data_dir)})
    record.writes = rank() == 0  # under torchrun rank 0 writes prep.json

    with shared_workers():  # one set of worker processes for the corpus and every step
        start = time.time()
        manifests = main_first(make_corpus, data_dir, progress=progress, jobs=jobs,
                               **settings["corpus"])
        record.step("corpus", time.time() - start)
        if _stops_after("corpus", through):
            return record.data
        lm_texts = {"train": manifests["lm_train"], "valid": manifests["lm_valid"]}
        return _chain(prep_dir, record, manifests, lm_texts, settings, progress, device,
                      through, lm_cores, jobs)


def prepare_kd_data_from_manifests(manifests, prep_dir, lm_text=None, settings=None,
                                   lm_valid_text=None, replacements=None, progress=False,
                                   device="cpu", through=None, jobs=1):
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
        Where the phone model trains and aligns, the unit LMs train and the teachers fill the
        caches (under ``torchrun``, ``"cuda"`` is each rank's own GPU).
    through : str, optional
        Stop after this step, as in :func:`prepare_kd_data` (the first is ``"manifests"``).
    jobs : int
        Processes for the shards of alignment, tree statistics, unit stores and teacher
        caches, as in :func:`prepare_kd_data`.

    Returns
    -------
    dict
        ``prep.json``'s content, as :func:`prepare_kd_data` returns it.
    """
    if through != "manifests":
        _stops_after("corpus", through)  # an unknown step name fails before any work
    check_jobs(jobs)
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
    record = main_first(prep_record, prep_dir, settings, source)
    record.writes = rank() == 0  # under torchrun rank 0 writes prep.json

    start = time.time()
    written = {
        split: main_first(_import_manifest, Path(path), prep_dir / "data" / f"{split}.csv",
                          replacements)
        for split, path in manifests.items()
    }
    lm_texts = main_first(_lm_texts, prep_dir / "lm_text", lm_text, lm_valid_text, written,
                          settings["lm"].get("max_train_sentences"))
    record.step("manifests", time.time() - start)
    if through == "manifests":
        return record.data
    return _chain(prep_dir, record, written, lm_texts, settings, progress, device, through,
                  jobs=jobs)


def _chain(prep_dir, record, manifests, lm_texts, settings, progress, device, through=None,
           lm_cores=None, jobs=1):
    """The steps after the corpus (module docstring), on CSV ``manifests`` and ``lm_texts``;
    returns after step ``through`` when it is given. The sharded steps share one set of
    ``jobs`` worker processes: each starts once and keeps the lexicon and aligner it loaded."""
    with shared_workers():
        return _steps(prep_dir, record, manifests, lm_texts, settings, progress, device,
                      through, lm_cores, jobs)


def _steps(prep_dir, record, manifests, lm_texts, settings, progress, device, through,
           lm_cores, jobs):
    from sb_crossmodal_kd.units.lexicon import Lexicon

    start = time.time()
    tokenizer = main_first(_tokenizer, prep_dir / "tokenizer", manifests["train"],
                           settings["vocab_size"], settings["fit_vocab_size"])
    record.step("tokenizer", time.time() - start, tokenizer=tokenizer.hash,
                vocab_size=tokenizer.vocab_size)
    if _stops_after("tokenizer", through):
        return record.data

    start = time.time()
    lexicon = Lexicon.load(_lexicon_file(settings), oov_policy=settings["oov_policy"])
    _aligner(prep_dir / "align", manifests["train"], lexicon, settings, progress, device, jobs)
    alignments = {
        split: _alignments(prep_dir / "align", split, manifests[split], _lexicon_file(settings),
                           settings, jobs, device)
        for split in settings["splits"]
    }
    record.step("lexicon_alignment", time.time() - start, lexicon=lexicon.hash)
    if _stops_after("lexicon_alignment", through):
        return record.data

    start = time.time()
    tree = _tree(prep_dir / "senone_tree.json", alignments["train"], manifests["train"],
                 _lexicon_file(settings), settings, jobs)
    record.step("senone_tree", time.time() - start, n_senones=tree.num_senones, tree=tree.hash)
    if _stops_after("senone_tree", through):
        return record.data

    start = time.time()
    stores = {
        split: _unit_store(prep_dir / "units" / f"{split}.units", alignments[split],
                           manifests[split], lexicon, tree, tokenizer, jobs)
        for split in settings["splits"]
    }
    record.step("unit_stores", time.time() - start,
                unit_stores={split: str(path) for split, path in stores.items()})
    if _stops_after("unit_stores", through):
        return record.data

    start = time.time()
    lms = main_first(_unit_lms, prep_dir, lm_texts, settings, tokenizer.vocab_size, device,
                     lm_cores, jobs)
    record.step("unit_lms", time.time() - start,
                lm_valid_ppl={unit: lm["valid_ppl"] for unit, lm in lms.items()},
                lm_valid_ppl_curve={unit: lm.get("valid_ppl_curve", []) for unit, lm in lms.items()})
    if _stops_after("unit_lms", through):
        return record.data

    start = time.time()
    caches = {
        unit: {
            split: str(_teacher_cache(prep_dir, unit, split, stores[split], settings, device,
                                      progress, jobs))
            for split in settings["splits"]
        }
        for unit in lm_unit_types()
    }
    from sb_crossmodal_kd.teachers.cache import TeacherCache

    # How far each teacher's targets are from one-hot, on the positions the heads train on.
    statistics = {unit: TeacherCache(caches[unit]["train"]).statistics() for unit in caches}
    record.step("teacher_caches", time.time() - start, teacher_caches=caches,
                teacher_statistics=statistics)
    return record.data


def _stops_after(step, through):
    """Whether a chain asked to stop after step ``through`` (None: run all) ends at ``step``."""
    if through is None:
        return False
    if through not in STEPS:
        raise ValueError(f"Unknown step {through!r}; the steps are {', '.join(STEPS)}")
    return STEPS.index(through) <= STEPS.index(step)
