"""Records the operations that read a tensor's value back to the host: on a GPU each one
stalls the step until the device has caught up (a synchronisation)."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostReads(TorchDispatchMode):
    """Within the block, ``reads`` lists every ``.item()``/``int()``/``bool()`` of a tensor
    and every operation whose output size depends on tensor values (boolean indexing,
    nonzero, unique)."""

    VALUE_SIZED = {"nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive"}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name == "index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])
        )
        if name == "_local_scalar_dense" or name in self.VALUE_SIZED or bool_index:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))
