"""Precompute a teacher LM's top-k distributions for every utterance of a manifest."""

import json
import logging

from sb_crossmodal_kd.commands.pronunciation import add_pronunciation_options
from sb_crossmodal_kd.teachers import TEACHER_KINDS, load_teacher
from sb_crossmodal_kd.teachers.cache import (
    build_cache,
    utterances_from_manifest,
    utterances_from_unit_store,
)
from sb_crossmodal_kd.units.types import TextUnits, unit_type_names

logger = logging.getLogger(__name__)


def add_arguments(parser):
    """Registers the manifest, unit, teacher and cache options."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--units-store", help="unit store of the split (sbkd export-units): its "
                        "sequences are the ones the frame alignments index (preferred)")
    source.add_argument("--manifest", help="SpeechBrain CSV (ID and wrd columns): transcripts "
                        "converted to units here")
    parser.add_argument("--column", default="wrd", help="transcript column (default wrd)")
    parser.add_argument("--units", required=True, choices=unit_type_names())
    parser.add_argument("--tokenizer", help="subwords: <vocab>_<type>.model (SentencePiece) or "
                        "a transformers tokenizer folder (default for transformers teachers: "
                        "the teacher's own)")
    parser.add_argument("--tree", help="senones: tree JSON written by SenoneTree.save")
    # --tokenizer, --tree, --oov-policy, --lexicon, --silence and --column: --manifest only.
    add_pronunciation_options(parser)
    parser.add_argument("--silence", default="none", choices=["none", "edges", "between"])
    parser.add_argument("--teacher", required=True, help="teacher LM folder (a unit LM export, "
                        "a SpeechBrain LM with hyperparams.yaml, or a transformers folder)")
    parser.add_argument("--teacher-kind", default="auto", choices=TEACHER_KINDS)
    parser.add_argument("--output", required=True, help="cache folder (resumed if unfinished)")
    parser.add_argument("--k", type=int, default=32, help="probabilities kept per position")
    parser.add_argument("--tau", type=float, default=1.0, help="teacher temperature")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=1000, help="utterances per shard")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu "
                        "(under torchrun, cuda is each rank's own GPU)")
    parser.add_argument("--jobs", type=int, default=1, help="processes computing shards "
                        "(default 1; under torchrun, on each rank); the cache is the same bytes")


def run(args):
    """Loads teacher and units, checks they agree, builds (or resumes) the cache."""
    teacher = load_teacher(args.teacher, kind=args.teacher_kind)
    tokenizer = args.tokenizer
    if args.units == "subword" and tokenizer is None and teacher.name.startswith("hf-"):
        tokenizer = args.teacher  # a transformers teacher's units are its own tokens
    if args.units_store:
        utterances, units_hash = utterances_from_unit_store(args.units_store, args.units)
        skipped = []
    else:
        text_units = TextUnits.from_files(args.units, tokenizer=tokenizer, tree=args.tree,
                                          oov_policy=args.oov_policy, silence=args.silence,
                                          lexicon=args.lexicon)
        if text_units.vocab_size != teacher.vocab_size:
            raise SystemExit(
                f"the {args.units} units have {text_units.vocab_size} ids but the teacher "
                f"{args.teacher} predicts {teacher.vocab_size}: they were built for other units"
            )
        utterances, skipped = utterances_from_manifest(args.manifest, text_units, args.column)
        units_hash = text_units.hash
    for utt_id, reason in skipped:
        logger.warning("skipped %s: %s", utt_id, reason)
    header = build_cache(
        teacher, utterances, args.output, k=args.k, tau=args.tau, unit_type=args.units,
        tokenizer_hash=units_hash, shard_size=args.shard_size,
        batch_size=args.batch_size, device=args.device, jobs=args.jobs,
    )
    summary = {key: header[key] for key in ("unit_type", "vocab_size", "k", "temperature",
                                            "n_utterances", "n_positions", "n_shards")}
    summary["skipped"] = len(skipped)
    summary["output"] = str(args.output)
    print(json.dumps(summary))
