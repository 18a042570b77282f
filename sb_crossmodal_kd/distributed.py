"""Reductions across the processes of a DDP run (``torchrun``), no-ops in a single process.

SpeechBrain's DDP synchronises gradients only. Everything else a process accumulates by
itself (MoE usage counters, the balancing constraint's running totals, epoch averages of
loss terms) must be combined explicitly so that every rank holds, and logs, the same
values. The package does that through these few functions, never through
``torch.distributed`` directly.

:func:`run_on_local_ranks` starts such ranks on this machine for a program that ``torchrun``
did not start (``--jobs``), with torch's own launcher.

The reductions and gathers here are collectives under DDP: all ranks must call them, in
the same order. Inside SpeechBrain's ``run_on_main`` / ``main_process_only`` sections, where only the main
process runs, they do nothing (as ``speechbrain.utils.distributed.ddp_all_reduce``).
"""

import atexit
import contextlib
import dataclasses
import logging
import os
import pickle
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch
from speechbrain.utils.distributed import (
    ddp_all_reduce,
    ddp_init_group,
    ddp_prevent_block,
    get_rank,
)


def init_distributed(run_opts):
    """SpeechBrain's ``ddp_init_group`` for a recipe's ``main``, choosing the backend.

    Under ``torchrun`` without ``--distributed_backend``, the backend is nccl where CUDA is
    available and gloo otherwise (SpeechBrain's default, nccl, refuses a machine without
    GPUs). The group is destroyed when the process exits, before the interpreter shuts
    down. Outside ``torchrun`` this does nothing.

    Arguments
    ---------
    run_opts : speechbrain RunOptions or dict
        As ``speechbrain.parse_arguments`` returns them.

    Returns
    -------
    RunOptions or dict
        The run options to give the Brain, with the backend chosen.

    Example
    -------
    >>> init_distributed({})  # not under torchrun: nothing to do
    {}
    """
    if get_rank() is None:
        return run_opts
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if isinstance(run_opts, dict):
        run_opts = {"distributed_backend": backend, **run_opts}
    elif "distributed_backend" not in run_opts.overridden_args:
        # RunOptions is frozen; the Brain reads a run option only when marked as given.
        run_opts = dataclasses.replace(
            run_opts,
            distributed_backend=backend,
            overridden_args={*run_opts.overridden_args, "distributed_backend"},
        )
    ddp_init_group(run_opts)
    atexit.register(_destroy_group)
    return run_opts


def _destroy_group():
    # Left to interpreter shutdown, gloo's worker threads still hold tensors; destroying
    # them then aborts the process (SIGABRT, "terminate called without an active
    # exception") after its work is done, and torchrun reports the run as failed.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def finish_process():
    """Ends a ``torchrun`` process whose work is done: runs the exit handlers (the process
    group is destroyed, logs are flushed), flushes stdout and stderr and exits with status 0,
    skipping the interpreter's finalization. Outside ``torchrun`` it does nothing.

    Why: once a ``DistributedDataParallel`` module has been built, gloo's worker threads
    outlive ``destroy_process_group`` (its module keeps the group alive), and tearing them
    down in the interpreter's finalization now and then aborts a rank that has finished
    (SIGABRT, ``terminate called without an active exception``), which ``torchrun`` reports
    as a failed run. For a recipe's ``__main__``, after ``main`` returned: never call it on
    an error path, whose status must stay non-zero.

    Example
    -------
    >>> finish_process()  # not under torchrun: returns
    """
    if get_rank() is None:
        return
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def is_distributed():
    """Whether collectives run: a process group is up and not inside a main-only section.

    Example
    -------
    >>> is_distributed()
    False
    """
    return not ddp_prevent_block()


def world_size():
    """Number of processes of the run (1 without DDP).

    Example
    -------
    >>> world_size()
    1
    """
    return torch.distributed.get_world_size() if is_distributed() else 1


def sum_across_processes(tensors):
    """Element-wise sums of ``tensors`` over all processes, in one collective.

    The inputs are left unchanged: the sums are new tensors, so calling this twice on the
    same counters never counts a process twice.

    Arguments
    ---------
    tensors : list of torch.Tensor
        Tensors of any shapes and dtypes, all on the device the backend communicates on
        (CPU for gloo, the rank's GPU for nccl).

    Returns
    -------
    list of torch.Tensor
        The sums, in the inputs' shapes and dtypes (copies of the inputs without DDP).

    Example
    -------
    >>> counts, total = sum_across_processes([torch.tensor([1, 2]), torch.tensor(3.0)])
    >>> counts, total
    (tensor([1, 2]), tensor(3.))
    """
    tensors = list(tensors)
    if not tensors:
        return []
    if not is_distributed():
        return [t.clone() for t in tensors]
    # float64 holds integer counts exactly up to 2**53 and float32 sums without loss.
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    ddp_all_reduce(flat, torch.distributed.ReduceOp.SUM)
    sums, start = [], 0
    for t in tensors:
        sums.append(flat[start : start + t.numel()].view(t.shape).to(t.dtype))
        start += t.numel()
    return sums


def mean_across_processes(value, device="cpu"):
    """Mean of a number over all processes (itself without DDP).

    Example
    -------
    >>> mean_across_processes(2.5)
    2.5
    """
    if not is_distributed():
        return float(value)
    (total,) = sum_across_processes([torch.tensor(float(value), device=device)])
    return float(total) / world_size()


def gather_objects(obj):
    """One picklable object from every process, by rank (``[obj]`` without DDP).

    Example
    -------
    >>> gather_objects({"a": 1})
    [{'a': 1}]
    """
    if not is_distributed():
        return [obj]
    gathered = [None] * world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def gather_tensors(tensor):
    """``tensor`` of every process (all of one shape and dtype), stacked by rank:
    ``(world_size, *tensor.shape)`` on ``tensor``'s device; exact, unlike a sum, whose
    order of additions the backend chooses.

    Example
    -------
    >>> gather_tensors(torch.tensor([1.0, 2.0]))
    tensor([[1., 2.]])
    """
    if not is_distributed():
        return tensor.unsqueeze(0).clone()
    # nccl communicates from the rank's GPU, gloo from the CPU
    nccl = torch.distributed.get_backend() == "nccl"
    sent = tensor.to(rank_device("cuda") if nccl else "cpu").contiguous()
    gathered = [torch.empty_like(sent) for _ in range(world_size())]
    torch.distributed.all_gather(gathered, sent)
    return torch.stack(gathered).to(tensor.device)


def main_first(function, *args, **kwargs):
    """``function(*args, **kwargs)`` on rank 0, then on the other ranks once it has returned;
    its result on every rank (just the call without DDP).

    For a resumable step (one that builds its output once and loads it when it is there):
    rank 0 builds it, the others load it. A collective: all ranks call it.

    Example
    -------
    >>> main_first(max, 2, 3)
    3
    """
    if not is_distributed():
        return function(*args, **kwargs)
    if rank() != 0:
        torch.distributed.barrier()
    result = function(*args, **kwargs)
    if rank() == 0:
        torch.distributed.barrier()
    return result


def main_decides(function, *args, **kwargs):
    """``function(*args, **kwargs)`` on rank 0 alone, its result (or the error it raised) on
    every rank (just the call without DDP). A collective: all ranks call it.

    For what one process must decide before the ranks share work (which shards of a folder
    are still to do): the other ranks neither write nor look themselves, or they could see
    what rank 0 has started writing and disagree.

    Example
    -------
    >>> main_decides(max, 2, 3)
    3
    """
    if not is_distributed():
        return function(*args, **kwargs)
    outcome, error = None, None
    if rank() == 0:
        try:
            outcome = function(*args, **kwargs)
        except Exception as raised:  # raised on every rank below, not only here
            error = raised
    outcome, shared_error = gather_objects((outcome, error))[0]
    if error is not None:
        raise error
    if shared_error is not None:
        raise shared_error
    return outcome


def run_on_local_ranks(function, args, processes, threads=1):
    """``function(*args)`` on ``processes`` ranks of this machine; rank 0's result.

    The ranks are started as ``torchrun --standalone`` starts them (torch's elastic
    launcher, a local rendezvous on a free port), spawned, each with a gloo group and
    ``threads`` torch threads, so ``function`` runs there exactly as under ``torchrun``: the
    collectives of this module work, and every rank calls them. For a step of a program
    that was not started by ``torchrun`` but is given several processes (``--jobs``).
    ``function`` and ``args`` are pickled to the ranks (``function`` at module level): each
    rank has its own copy, as each ``torchrun`` process builds its own. The other ranks'
    results are dropped, so return ``None`` there.

    When a rank raises, the launcher stops the others (which may be waiting for it in a
    collective), and the error is raised here, with its type and message: the first one
    raised, if several ranks raised. A rank that died otherwise (a signal, the
    out-of-memory killer) is reported as a ``RuntimeError``. Ctrl-C stops every rank and
    raises ``KeyboardInterrupt``.

    Example
    -------
    >>> run_on_local_ranks(max, (2, 3), processes=1)
    3
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes,
                          run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0, start_method="spawn")
    # The launcher installs its own handlers for these, for good.
    handlers = {sig: signal.getsignal(sig)
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}
    with tempfile.TemporaryDirectory(prefix="local_ranks_") as errors, _launcher_quiet():
        try:
            # As bytes: pickled by the launcher itself, tensors would go to shared memory,
            # and the ranks would train one set of weights in place of one each.
            return elastic_launch(config, _local_rank)(
                pickle.dumps((function, args)), threads, errors)[0]
        except ChildFailedError as failed:
            raised = sorted(Path(errors).glob("*.pickle"))
            if not raised:
                deaths = "; ".join(f"rank {r}: exit code {f.exitcode} ({f.signal_name()})"
                                   if f.exitcode < 0 else f"rank {r}: exit code {f.exitcode}"
                                   for r, f in sorted(failed.failures.items()))
                raise RuntimeError(f"a local rank died: {deaths}") from None
            first = min((pickle.loads(path.read_bytes()) for path in raised),
                        key=lambda timed: timed[0])
            raise first[1] from None
        except SignalException as stopped:
            if stopped.sigval == signal.SIGINT:
                raise KeyboardInterrupt from None
            raise
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)


@contextlib.contextmanager
def _launcher_quiet():
    """The launcher's own logs off: a rank's failure is raised as its error, and the
    launcher would log it first as a traceback of its own."""
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name.startswith(("torch.distributed.elastic", "torch.multiprocessing"))]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _local_rank(call, threads, errors):
    # An error is left in the folder `errors` for run_on_local_ranks (raised out of here,
    # it would reach it as the launcher's ChildFailedError, without type or message); the
    # non-zero exit then has the launcher stop the other ranks.
    torch.set_num_threads(threads)
    init_distributed({"distributed_backend": "gloo"})
    try:
        function, args = pickle.loads(call)
        return function(*args)
    except Exception as error:
        failed_at = time.time()  # one machine: the ranks' clocks agree
        try:
            report = pickle.dumps((failed_at, error))
        except Exception:
            report = pickle.dumps((failed_at, RuntimeError(f"{type(error).__name__}: {error}")))
        Path(errors, f"rank{get_rank()}.pickle").write_bytes(report)
        sys.exit(1)  # no traceback; the launcher sees a failed rank
    finally:
        _destroy_group()


def rank_device(device=None):
    """The device a process computes on: ``device``, by default ``cuda`` where there is one
    and else ``cpu``; under ``torchrun``, ``"cuda"`` is the rank's own GPU
    (``cuda:LOCAL_RANK``).

    Example
    -------
    >>> rank_device("cpu")
    'cpu'
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and world_size() > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


def rank():
    """This process's rank (0 without DDP).

    Example
    -------
    >>> rank()
    0
    """
    return torch.distributed.get_rank() if is_distributed() else 0


def unwrap(module):
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (SpeechBrain
    wraps each module of a Brain that has parameters), or ``module`` itself.

    Read a module's own attributes through this; call the wrapper itself for the forward
    pass, so that DDP synchronises the gradients.

    Example
    -------
    >>> linear = torch.nn.Linear(2, 2)
    >>> unwrap(torch.nn.DataParallel(linear)) is linear, unwrap(linear) is linear
    (True, True)
    """
    if isinstance(module, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel):
        return module.module
    return module
