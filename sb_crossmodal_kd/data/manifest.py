"""Reading and checking SpeechBrain manifests (ID, duration, wav, wrd, ...), CSV or JSON.

Any recipe of this package accepts a user's own manifest; this module checks it up front so
that a bad row stops the run with the file, line (CSV) or utterance named, not mid-epoch.
Both of SpeechBrain's formats are read by :func:`read_manifest_rows`: a CSV with a header
(``$name`` replacements) or a JSON object ``{ID: {"wav": ..., "duration": ..., "wrd": ...}}``
(``{name}`` replacements, as ``speechbrain.dataio.dataio.load_data_json``). Extra columns are
kept; missing required ones are an error. :func:`write_manifest_csv` writes checked rows as a
SpeechBrain CSV, which is what the recipes' data loaders read.

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
import io
import json
import logging
from pathlib import Path

from sb_crossmodal_kd.io import atomic_write_text

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("ID", "duration", "wav", "wrd")
# A row's duration may differ from its audio's by this fraction (rounding in manifests); more
# means a truncated or wrong file, which batching by duration would silently mis-size.
DURATION_TOLERANCE = 0.1


class ManifestError(ValueError):
    """A manifest row or column that a recipe cannot use."""


def read_manifest_rows(path, required=REQUIRED_COLUMNS, replacements=None):
    """The rows of a CSV or JSON manifest as ``(where, row)`` pairs, unchecked but complete.

    Arguments
    ---------
    path : str or Path
        ``*.json``: SpeechBrain's JSON manifest (the key of each entry is its ``ID``);
        anything else: a CSV with a header row.
    required : tuple of str
        Columns every row must have.
    replacements : dict, optional
        ``{"data_root": "/path"}`` substitutes ``$data_root`` (CSV) or ``{data_root}`` (JSON)
        in string fields, as SpeechBrain's loaders do.

    Returns
    -------
    list of (str, dict)
        ``where`` names the file and line (CSV) or entry (JSON) for error messages; ``row``
        maps column to value (strings in a CSV, JSON values otherwise).

    Example
    -------
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / "m.json").write_text(
    ...     '{"u1": {"wav": "{root}/a.flac", "duration": 1.5, "wrd": "HELLO", "spk_id": 3}}')
    >>> where, row = read_manifest_rows(folder / "m.json", replacements={"root": "/data"})[0]
    >>> row["ID"], row["wav"], row["spk_id"]
    ('u1', '/data/a.flac', 3)
    >>> _ = (folder / "bad.json").write_text('{"u1": {"wav": "a.flac", "duration": 1.5}}')
    >>> read_manifest_rows(folder / "bad.json")
    Traceback (most recent call last):
    ...
    sb_crossmodal_kd.data.manifest.ManifestError: .../bad.json, entry 'u1': missing field(s) wrd...
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    replacements = replacements or {}
    if path.suffix.lower() == ".json":
        return _json_rows(path, required, replacements)
    return _csv_rows(path, required, replacements)


def _csv_rows(path, required, replacements):
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, skipinitialspace=True)
        columns = reader.fieldnames or []
        missing = [c for c in required if c not in columns]
        if missing:
            raise ManifestError(
                f"{path}: missing column(s) {', '.join(missing)}; a manifest needs "
                f"{', '.join(required)} (it has {', '.join(columns) or 'none'})"
            )
        rows = []
        for line, row in enumerate(reader, start=2):
            if None in row:  # more fields than the header names
                raise ManifestError(
                    f"{path}, line {line}: {len(columns) + len(row[None])} fields for "
                    f"{len(columns)} columns; quote fields that contain commas"
                )
            for key, value in row.items():
                if isinstance(value, str):
                    for name, sub in replacements.items():
                        value = value.replace(f"${name}", str(sub))
                    row[key] = value
            rows.append((f"{path}, line {line}", row))
    return rows


def _json_rows(path, required, replacements):
    from speechbrain.dataio.dataio import load_data_json

    try:
        entries = load_data_json(str(path), replacements)
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    except (KeyError, ValueError) as err:  # a {name} with no replacement, e.g. {data_root}
        raise ManifestError(
            f"{path}: cannot substitute {err} in a field; pass it as a replacement"
        ) from None
    if not isinstance(entries, dict):
        raise ManifestError(f"{path}: a JSON manifest is an object {{ID: {{field: value}}}}")
    rows = []
    for utt, fields in entries.items():
        where = f"{path}, entry {utt!r}"
        if not isinstance(fields, dict):
            raise ManifestError(f"{where}: the entry is not an object of fields")
        row = {"ID": utt, **{k: v for k, v in fields.items() if k != "ID"}}
        missing = [c for c in required if c not in row]
        if missing:
            raise ManifestError(
                f"{where}: missing field(s) {', '.join(missing)}; every entry needs "
                f"{', '.join(required)}"
            )
        rows.append((where, row))
    return rows


def check_manifest(
    path, required=REQUIRED_COLUMNS, replacements=None, check_audio=True, sample_rate=None
):
    """Checks a SpeechBrain CSV or JSON manifest and returns its rows.

    Arguments
    ---------
    path : str or Path
        The CSV or JSON file (:func:`read_manifest_rows`).
    required : tuple of str
        Columns every row must have.
    replacements : dict, optional
        ``{"data_root": "/path"}`` substitutes ``$data_root`` (CSV) or ``{data_root}`` (JSON)
        in fields, as SpeechBrain does.
    check_audio : bool
        Open every wav's header, so unreadable audio is found before training.
    sample_rate : int, optional
        With ``check_audio``, the rate the recipe reads audio at: files at other rates are
        resampled on load (:func:`~sb_crossmodal_kd.data.audio.load_audio`), and how many
        there are is logged once for the manifest.

    Returns
    -------
    list of dict
        The rows, with replacements applied.

    Raises
    ------
    ManifestError
        Naming the file, line (or JSON entry) and utterance: a missing column, a duplicate or
        empty ID, an empty transcript, a bad duration, a missing or unreadable wav, or (with
        ``check_audio``) a duration more than 10 % off the audio's.
    """
    rows, seen, other_rates = [], set(), {}
    for where, row in read_manifest_rows(path, required, replacements):
        rate = _check_row(where, row, seen, check_audio)
        if sample_rate and rate and rate != sample_rate:
            other_rates[rate] = other_rates.get(rate, 0) + 1
        rows.append(row)
    if not rows:
        raise ManifestError(f"{path}: the manifest has no rows")
    if other_rates:
        found = ", ".join(f"{count} at {rate} Hz" for rate, count in sorted(other_rates.items()))
        logger.info("%s: %d of %d audio files are not at %d Hz (%s); they are resampled on "
                    "load", path, sum(other_rates.values()), len(rows), sample_rate, found)
    return rows


def write_manifest_csv(path, rows, columns=REQUIRED_COLUMNS):
    """Writes ``rows`` as a SpeechBrain CSV (atomically): ``columns`` first, then every other
    column that all rows have with a plain (str, int, float) value.

    Example
    -------
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "m.csv"
    >>> write_manifest_csv(path, [{"ID": "u1", "duration": 1.5, "wav": "a.wav",
    ...                            "wrd": "HI, THERE", "spk_id": 7, "tags": ["x"]}])
    >>> print(path.read_text().strip())
    ID,duration,wav,wrd,spk_id
    u1,1.5,a.wav,"HI, THERE",7
    """
    extra = [
        key for key in rows[0]
        if key not in columns
        and all(isinstance(row.get(key), (str, int, float)) for row in rows)
    ]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*columns, *extra], extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def _check_row(where, row, seen, check_audio):
    """Raises ManifestError for a bad row; returns its audio's sample rate (None unread)."""
    utt = str(row.get("ID") or "").strip()
    if not utt:
        raise ManifestError(f"{where}: empty ID")
    if utt in seen:
        raise ManifestError(f"{where}: duplicate ID {utt!r}")
    seen.add(utt)
    where = f"{where} (utterance {utt})"
    if "wrd" in row and not str(row["wrd"] or "").strip():
        raise ManifestError(f"{where}: empty transcript; remove the row or give its words")
    duration = None
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
        actual = info.frames / info.samplerate
        if duration is not None and abs(actual - duration) > DURATION_TOLERANCE * duration:
            raise ManifestError(
                f"{where}: the manifest says {duration:g} s but {wav} holds {actual:.3f} s (a "
                "truncated or another file?); fix the row's duration or the audio file"
            )
        return info.samplerate
    return None
