"""Starting recipes in several gloo processes under torchrun, for the DDP tests."""

import socket
import sys


def free_port():
    """A TCP port free on this machine now (for torchrun's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(args, nproc=2):
    """The command running ``args`` (a script and its arguments) in ``nproc`` processes."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args]
