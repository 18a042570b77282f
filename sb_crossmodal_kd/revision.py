"""Where a result was made: the commit of the package's source, the command and the machine.

Example
-------
>>> revision = source_revision()
>>> revision is None or len(revision.removesuffix("+dirty")) == 40
True
"""

import subprocess
from pathlib import Path

__all__ = ["create_experiment_folder", "environment_description", "invoked_command", "run_context",
           "source_revision"]


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


def invoked_command(subcommand):
    """The command line of this process when it is ``sbkd <subcommand> ...`` (what a result
    records it was made by); None otherwise (e.g. a test calling the command's function).

    Example
    -------
    >>> invoked_command("demo") is None  # this process is not `sbkd demo`
    True
    """
    import shlex
    import sys

    return shlex.join(["sbkd", *sys.argv[1:]]) if sys.argv[1:2] == [subcommand] else None


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


def environment_description():
    """What SpeechBrain writes to an experiment's ``env.log`` (Python, installed packages,
    source revision, CUDA), with the packages read from their metadata: SpeechBrain's own
    runs ``pip freeze`` in a subprocess, about 2 s of every run.

    Example
    -------
    >>> from importlib.metadata import version
    >>> text = environment_description()
    >>> text.splitlines()[0], f"torch=={version('torch')}" in text.splitlines()
    ('SpeechBrain system description', True)
    """
    import importlib.metadata
    import sys

    import torch

    packages = sorted({f"{dist.metadata['Name']}=={dist.version}"
                       for dist in importlib.metadata.distributions() if dist.metadata["Name"]},
                      key=str.lower)
    if torch.cuda.is_available():
        cuda = (f"ROCm version:\n{torch.version.hip}" if torch.version.cuda is None
                else f"CUDA version:\n{torch.version.cuda}")
    else:
        cuda = "CUDA not available"
    rule = "=============================="
    return "\n".join(["SpeechBrain system description", rule, "Python version:", sys.version,
                      rule, "Installed Python packages:", *packages, rule, "Git revision:",
                      source_revision() or "none (not a git clone)", rule, cuda]) + "\n"


def create_experiment_folder(experiment_directory, hyperparams_to_save, overrides=None):
    """``speechbrain.create_experiment_directory`` (the folder, the hparams copy with
    ``overrides``, the log), with ``env.log`` written from :func:`environment_description`
    by the main process instead of SpeechBrain's ``pip freeze`` subprocess (2 s a run).

    Example
    -------
    >>> import logging, pathlib, tempfile
    >>> logging.disable(logging.INFO)  # SpeechBrain logs the new folder to stdout
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> hparams = folder / "in.yaml"
    >>> _ = hparams.write_text("lr: 0.1\\n")
    >>> create_experiment_folder(folder / "exp", hparams, {"lr": 0.2})
    >>> (folder / "exp" / "env.log").read_text().startswith("SpeechBrain system description")
    True
    >>> "lr: 0.2" in (folder / "exp" / "hyperparams.yaml").read_text()
    True
    >>> logging.disable(logging.NOTSET)
    """
    import speechbrain as sb
    from speechbrain.utils.distributed import if_main_process

    from sb_crossmodal_kd.io import atomic_write_text

    sb.create_experiment_directory(experiment_directory=str(experiment_directory),
                                   hyperparams_to_save=str(hyperparams_to_save),
                                   overrides=overrides, save_env_desc=False)
    if if_main_process():
        atomic_write_text(Path(experiment_directory) / "env.log", environment_description())
