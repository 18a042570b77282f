"""Where a result was made: the commit of the package's source, the command and the machine.

Example
-------
>>> revision = source_revision()
>>> revision is None or len(revision.removesuffix("+dirty")) == 40
True
"""

import subprocess
from pathlib import Path

__all__ = ["run_context", "source_revision"]


def source_revision(folder=None):
    """``git rev-parse HEAD`` of the clone holding ``folder`` (default: this package), with
    ``+dirty`` when tracked files differ from it; None outside a git clone (an installed
    wheel) or without git.

    Example
    -------
    >>> import tempfile
    >>> source_revision(tempfile.mkdtemp()) is None
    True
    """
    folder = Path(folder) if folder is not None else Path(__file__).resolve().parent

    def git(*args):
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True,
                              text=True, timeout=30, check=False)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = git("diff", "--quiet", "HEAD").returncode != 0
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def run_context(command=None, device="cpu"):
    """Where and from what a result was made: the source commit, the command, the device, the
    CPU count and the GPU's name (None on the CPU).

    Example
    -------
    >>> context = run_context("sbkd demo --study", device="cpu")
    >>> sorted(context), context["command"], context["gpu"]
    (['command', 'commit', 'cpus', 'device', 'gpu'], 'sbkd demo --study', None)
    """
    import os

    gpu = None
    if str(device).startswith("cuda"):
        import torch

        gpu = torch.cuda.get_device_name(torch.device(device)) if torch.cuda.is_available() else None
    return {"commit": source_revision(), "command": command, "device": str(device),
            "cpus": os.cpu_count(), "gpu": gpu}
