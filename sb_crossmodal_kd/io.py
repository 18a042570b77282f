"""Atomic file writes, the refusal of a folder made with other settings, and a folder held
by one process at a time.

A file is either absent or complete, never half written.

Every writer in the package goes through these helpers (temp file in the same folder, then
``os.replace``), so an interrupted run never leaves a truncated file that a re-run would
mistake for a finished one.

Example
-------
>>> import tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> atomic_write_text(folder / "a.txt", "hello\\n")
>>> (folder / "a.txt").read_text()
'hello\\n'
>>> oct((folder / "a.txt").stat().st_mode & 0o077) != oct(0)
True
"""

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path):
    """Yields a temporary path next to ``path``; renames it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes the file private (0600); give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text):
    """Writes ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path, data):
    """Writes ``data`` (bytes) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path, obj):
    """Writes ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_wav_atomic(path, waveform, sample_rate):
    """Writes a mono float waveform as 16-bit PCM wav atomically."""
    import soundfile

    with atomic_path(path) as tmp:
        soundfile.write(str(tmp), waveform, sample_rate, subtype="PCM_16", format="WAV")


class OtherSettingsError(FileExistsError):
    """A folder holds work made with other settings: refused, never mixed in."""


def refuse_other_settings(found, wanted, what, remedy="Choose another folder or delete that one",
                          error=OtherSettingsError):
    """Raises ``error`` unless the settings a folder records (``found``) are ``wanted``.

    The message names ``what`` the folder holds, the keys that differ and ``remedy``. Every
    resumable step of the package checks its folder this way before doing any work, through
    the record of what the folder was built from
    (:class:`~sb_crossmodal_kd.prep.provenance.Provenance`).

    Example
    -------
    >>> refuse_other_settings({"n": 1}, {"n": 1}, "corpus/ holds a corpus made")
    >>> refuse_other_settings({"n": 1, "seed": 2}, {"n": 1, "seed": 3},
    ...                       "corpus/ holds a corpus made")
    Traceback (most recent call last):
    ...
    sb_crossmodal_kd.io.OtherSettingsError: corpus/ holds a corpus made with other settings (differs in: seed). Choose another folder or delete that one; nothing was changed.
    """
    found = found if isinstance(found, dict) else {}
    if found == wanted:
        return
    changed = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
    raise error(f"{what} with other settings (differs in: {', '.join(changed)}). {remedy}; "
                "nothing was changed.")


class FolderInUseError(OSError):
    """Another process holds the folder (see :func:`exclusive_folder`)."""


LOCK_NAME = ".sbkd.lock"


@contextmanager
def exclusive_folder(folder):
    """Holds ``folder`` (created if absent) for this process during the ``with`` block.

    Another process asking for it meanwhile gets :class:`FolderInUseError` at once, naming
    the holder's pid. The hold is an advisory lock on ``LOCK_NAME`` in the folder, which the
    operating system releases however the holder ends (killed included); the file itself
    stays. Where ``fcntl`` is missing (Windows) nothing is locked.

    Example
    -------
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> with exclusive_folder(folder):
    ...     pass  # another process here would be refused
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_NAME, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise FolderInUseError(
                f"{folder} is in use by {holder}, which is still running on it: wait for it to "
                "finish (a rerun then resumes) or stop it, or give another folder"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        yield
