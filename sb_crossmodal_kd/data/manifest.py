"""Reading and checking SpeechBrain CSV manifests (ID, duration, wav, wrd, ...).

Any recipe of this package accepts a user's own manifest; this module checks it up front so
that a bad row stops the run with the file, line and utterance named, not mid-epoch.

Example
-------
>>> import tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> _ = (folder / "bad.csv").write_text("ID,duration,wav\\nu1,1.0,x.wav\\n")
>>> check_manifest(folder / "bad.csv")
Traceback (most recent call last):
...
sb_crossmodal_kd.data.manifest.ManifestError: .../bad.csv: missing column(s) wrd; ...
"""

import csv
from pathlib import Path

REQUIRED_COLUMNS = ("ID", "duration", "wav", "wrd")


class ManifestError(ValueError):
    """A manifest row or column that a recipe cannot use."""


def check_manifest(
    path, required=REQUIRED_COLUMNS, replacements=None, check_audio=True, expected_sample_rate=None
):
    """Checks a SpeechBrain CSV manifest and returns its rows.

    Arguments
    ---------
    path : str or Path
        The CSV file.
    required : tuple of str
        Columns every row must have.
    replacements : dict, optional
        ``{"data_root": "/path"}`` substitutes ``$data_root`` in fields, as SpeechBrain does.
    check_audio : bool
        Open every wav's header, so unreadable audio is found before training.
    expected_sample_rate : int, optional
        With ``check_audio``, refuse audio at another sample rate.

    Returns
    -------
    list of dict
        The rows, with replacements applied.

    Raises
    ------
    ManifestError
        Naming the file, line and utterance: a missing column, a duplicate or empty ID,
        an empty transcript, a bad duration, or a missing or unreadable wav.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    replacements = replacements or {}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle, skipinitialspace=True)
        columns = reader.fieldnames or []
        missing = [c for c in required if c not in columns]
        if missing:
            raise ManifestError(
                f"{path}: missing column(s) {', '.join(missing)}; a manifest needs "
                f"{', '.join(required)} (it has {', '.join(columns) or 'none'})"
            )
        rows, seen = [], set()
        for line, row in enumerate(reader, start=2):
            for key, value in row.items():
                if isinstance(value, str):
                    for name, sub in replacements.items():
                        value = value.replace(f"${name}", str(sub))
                    row[key] = value
            _check_row(path, line, row, seen, check_audio, expected_sample_rate)
            rows.append(row)
    if not rows:
        raise ManifestError(f"{path}: the manifest has no rows")
    return rows


def _check_row(path, line, row, seen, check_audio, expected_sample_rate):
    utt = (row.get("ID") or "").strip()
    where = f"{path}, line {line}"
    if not utt:
        raise ManifestError(f"{where}: empty ID")
    if utt in seen:
        raise ManifestError(f"{where}: duplicate ID {utt!r}")
    seen.add(utt)
    where = f"{where} (utterance {utt})"
    if "wrd" in row and not (row["wrd"] or "").strip():
        raise ManifestError(f"{where}: empty transcript; remove the row or give its words")
    if "duration" in row:
        try:
            duration = float(row["duration"])
        except (TypeError, ValueError):
            raise ManifestError(f"{where}: duration {row['duration']!r} is not a number") from None
        if not duration > 0:
            raise ManifestError(f"{where}: duration must be positive, got {duration}")
    if check_audio and "wav" in row:
        wav = Path(row["wav"])
        if not wav.is_file():
            raise ManifestError(f"{where}: audio file {wav} does not exist")
        import soundfile

        try:
            info = soundfile.info(str(wav))
        except Exception as err:  # soundfile raises several types for corrupt files
            raise ManifestError(f"{where}: cannot read audio {wav}: {err}") from None
        if info.frames == 0:
            raise ManifestError(f"{where}: audio file {wav} is empty")
        if expected_sample_rate and info.samplerate != expected_sample_rate:
            raise ManifestError(
                f"{where}: {wav} is sampled at {info.samplerate} Hz but the recipe expects "
                f"{expected_sample_rate} Hz; resample it or set sample_rate"
            )
