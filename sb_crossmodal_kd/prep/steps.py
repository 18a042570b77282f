"""The chain's resumable steps: each builds its output once and loads it when it is there.

Tokenizer, phone aligner, alignments of a split, senone tree, unit store of a split, and teacher
cache of a unit type and split, in the order :mod:`~sb_crossmodal_kd.prep.chain` runs them
(the unit LMs between the last two: :mod:`~sb_crossmodal_kd.prep.unit_lms`).
"""

import json
import logging

from sb_crossmodal_kd.distributed import main_decides, main_first, rank, rank_device

logger = logging.getLogger(__name__)


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


def _aligner(folder, train_manifest, lexicon, settings, progress, device="cpu", jobs=1):
    """The phone model of ``folder`` (trained there once). Under ``torchrun`` every rank calls
    this: the ranks share its training (gradient steps and alignments), rank 0 saves it."""
    from sb_crossmodal_kd.alignment.corpus import read_manifest
    from sb_crossmodal_kd.alignment.forced import AlignerSettings, PhoneAligner
    from sb_crossmodal_kd.units.lexicon import oov_report

    path = folder / "aligner.pt"
    if main_decides(path.is_file):
        return PhoneAligner.load(path, lexicon, rank_device(device))
    rows = read_manifest(train_manifest)

    def report_oov():
        folder.mkdir(parents=True, exist_ok=True)
        report = oov_report(lexicon, [(r["ID"], r["wrd"]) for r in rows],
                            folder / "train_oov.txt")
        logger.info("train OOV rate %.4f (%d types, fallback: %s)", report["oov_rate"],
                    report["oov_types"], settings["oov_policy"])

    main_decides(report_oov)
    aligner = PhoneAligner(lexicon, AlignerSettings(**settings["aligner"]), rank_device(device))
    rows = rows[: settings["aligner_utterances"]]
    report = aligner.train([(r["ID"], r["wav"], r["wrd"]) for r in rows],
                           progress=progress and rank() == 0, jobs=jobs)
    logger.info("phone model trained on %d utterances (%.2f h of audio) in %.0f s (%s)",
                report["utterances"], report["audio_seconds"] / 3600, report["seconds"],
                ", ".join(f"{phase} {s:.0f} s" for phase, s in report["phase_seconds"].items()))
    main_decides(aligner.save, path)  # the others go on once it is there
    return aligner


def _alignments(folder, split, manifest, lexicon_file, settings, jobs, device="cpu"):
    """A split's alignments, shard by shard (``align/{split}_shards/``, kept when complete),
    and their one-document file ``align/{split}_phone_alignments.json``. A folder prepared
    before the shards had only that file: it is cut into shards once, not aligned again."""
    from sb_crossmodal_kd.alignment.sharded import align_split

    document = folder / f"{split}_phone_alignments.json"
    shards = folder / f"{split}_shards"
    main_first(_older_alignments, document, manifest, shards, folder / "aligner.pt",
               lexicon_file, settings["oov_policy"])
    alignments, report = align_split(folder / "aligner.pt", manifest, shards, lexicon_file,
                                     settings["oov_policy"], jobs, document=document,
                                     header={"manifest": str(manifest)}, device=device)
    if report["skipped"]:
        logger.warning("%s: %d utterances not aligned, e.g. %s", split, len(report["skipped"]),
                       report["skipped"][0])
    if report["shards_built"]:
        logger.info("%s: aligned %d shards, %.1f audio s/s", split, report["shards_built"],
                    report["audio_s_per_s"])
    return alignments


def _older_alignments(document, manifest, shards, *aligner):
    """Cuts a split's one-document alignments into shards, where a folder has no shards."""
    from sb_crossmodal_kd.alignment.sharded import import_alignments_document

    if document.is_file() and not shards.is_dir():
        import_alignments_document(document, manifest, shards, *aligner)


def _tree(path, alignments, manifest, lexicon_file, settings, jobs):
    from sb_crossmodal_kd.alignment.sharded import split_tree_statistics
    from sb_crossmodal_kd.units.senones import SenoneTree

    if path.is_file():
        return SenoneTree.load(path)
    stats = split_tree_statistics(alignments, manifest, path.parent / "align" / "aligner.pt",
                                  lexicon_file, settings["oov_policy"], jobs)
    tree = SenoneTree.build(stats, **settings["tree"])  # every rank: the same statistics
    if rank() == 0:
        tree.save(path)
    return tree


def _unit_store(path, alignments, manifest, lexicon, tree, tokenizer, jobs):
    from sb_crossmodal_kd.alignment.sharded import export_split_units
    from sb_crossmodal_kd.units.store import UnitStore, UnitStoreMismatchError

    expect = {"lexicon": lexicon.hash, "tokenizer": tokenizer.hash, "tree": tree.hash}
    if path.is_file():
        try:
            UnitStore(path, expect=expect)
            return path
        except UnitStoreMismatchError as error:  # an upstream step was rebuilt
            logger.warning("%s; rebuilding it", error)
    path.parent.mkdir(parents=True, exist_ok=True)
    export_split_units(path, alignments, manifest, lexicon.hash, tree, tokenizer, jobs=jobs)
    return path


def _teacher_cache(prep_dir, unit, split, store, settings, device, progress, jobs=1):
    """The teacher cache ``caches/{unit}_{split}/`` (kept when complete), shard by shard in
    ``jobs`` processes and under ``torchrun`` over the ranks (a collective: every rank calls
    it)."""
    from sb_crossmodal_kd.teachers import load_teacher
    from sb_crossmodal_kd.teachers.cache import build_cache, utterances_from_unit_store

    folder = prep_dir / "caches" / f"{unit}_{split}"
    header = folder / "header.json"
    if header.is_file() and json.loads(header.read_text()).get("complete"):
        return folder
    utterances, units_hash = utterances_from_unit_store(store, unit)
    teacher = load_teacher(prep_dir / "lm" / unit / "lm")
    if str(device).startswith("cuda"):
        # One process per GPU (its rank's): more would each hold a CUDA context for a teacher
        # that keeps the device busy alone.
        jobs = 1
    build_cache(teacher, utterances, folder, k=settings["cache_k"],
                tau=settings["teacher_tau"][unit], unit_type=unit, tokenizer_hash=units_hash,
                device=device, progress=progress, jobs=jobs)
    return folder
