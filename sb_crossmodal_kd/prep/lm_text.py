"""The unit LMs' text: a given file, sampled when it is too large, or the transcripts."""

import logging
import random
from pathlib import Path

from sb_crossmodal_kd.io import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["LM_SAMPLE_SEED"]


LM_SAMPLE_SEED = 1986  # which LM sentences are kept when max_train_sentences limits them


def _transcripts(manifest):
    from sb_crossmodal_kd.alignment.corpus import read_manifest

    return [row["wrd"].strip() for row in read_manifest(manifest)]


def _lm_texts(folder, lm_text, lm_valid_text, manifests, max_sentences):
    """``{"train": path, "valid": path}`` of the unit LMs' text (see
    :func:`~sb_crossmodal_kd.prep.chain.prepare_kd_data_from_manifests`)."""
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
