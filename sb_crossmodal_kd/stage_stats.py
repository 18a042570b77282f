"""What every Brain of the package does with a stage's statistics: the same values on every
process, written to the same loggers.

Under DDP each process trains on its share of the data, so the train stage's loss of one
process is not the run's: :func:`stage_loss_across_processes` averages it over all
processes (a collective, which every rank calls). Valid and test run in full on every process and are taken as they
are. :func:`log_stats` writes one line of stats to every logger of :func:`train_loggers`.

Example
-------
>>> import speechbrain as sb
>>> stage_loss_across_processes(sb.Stage.TRAIN, 2.5)  # one process: its own
2.5
"""

import speechbrain as sb

from sb_crossmodal_kd.distributed import mean_across_processes

__all__ = ["log_stats", "stage_loss_across_processes", "train_loggers"]


def stage_loss_across_processes(stage, loss, device="cpu"):
    """The stage's loss as every process logs it: in training the mean over all processes
    (a collective under DDP), else ``loss`` itself."""
    if stage == sb.Stage.TRAIN:
        return mean_across_processes(loss, device)
    return loss


def train_loggers(hparams):
    """The loggers a Brain writes its stats to: ``train_logger``, and ``tensorboard_logger``
    when the hparams enable SpeechBrain's TensorBoard logger.

    Example
    -------
    >>> from types import SimpleNamespace
    >>> train_loggers(SimpleNamespace(train_logger="text", tensorboard_logger=None))
    ['text']
    """
    loggers = [hparams.train_logger]
    tensorboard = getattr(hparams, "tensorboard_logger", None)
    if tensorboard is not None:
        loggers.append(tensorboard)
    return loggers


def log_stats(hparams, **stats):
    """``log_stats(**stats)`` (``stats_meta``, ``train_stats``, ``valid_stats``,
    ``test_stats``) on every logger of :func:`train_loggers`."""
    for logger in train_loggers(hparams):
        logger.log_stats(**stats)
