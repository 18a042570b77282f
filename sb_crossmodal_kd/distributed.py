"""Reductions across the processes of a DDP run (``torchrun``), no-ops in a single process.

SpeechBrain's DDP synchronises gradients only. Everything else a process accumulates by
itself (MoE usage counters, the balancing constraint's running totals, epoch averages of
loss terms) must be combined explicitly so that every rank holds, and logs, the same
values. The package does that through these few functions, never through
``torch.distributed`` directly.

Every function here is a collective under DDP: all ranks must call it, in the same order.
Inside SpeechBrain's ``run_on_main`` / ``main_process_only`` sections, where only the main
process runs, they do nothing (as ``speechbrain.utils.distributed.ddp_all_reduce``).
"""

import atexit
import dataclasses
import os
import sys

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
