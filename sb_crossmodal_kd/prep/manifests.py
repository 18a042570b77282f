"""A corpus's SpeechBrain manifests, checked and written as the CSVs the KD recipe reads."""

import json

from sb_crossmodal_kd.io import atomic_write_text

__all__ = ["MANIFEST_SPLITS", "SAMPLE_RATE"]


MANIFEST_SPLITS = ("train", "valid", "test")  # what the KD recipe reads
SAMPLE_RATE = 16000  # the aligner's features and the KD recipe's front end


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
