"""The gating network of an MoE layer."""

import torch
import torch.nn.functional as F
from torch import nn


def _at_least_float32(x):
    """``x`` in float32, or as it is when wider (float64 stays float64)."""
    return x if x.dtype == torch.float64 else x.float()


class Router(nn.Module):
    """Gating network: logits over experts from a linear map or one hidden rectified layer.

    With ``noisy=True`` (Shazeer et al. 2017) training adds Gaussian noise with a learned,
    input-dependent scale ``softplus(W_noise x)`` to the logits; evaluation is noise-free.

    Arguments
    ---------
    input_size : int
        Input feature size.
    num_experts : int
        Number of experts.
    hidden_size : int, optional
        Size of the hidden rectified layer; None for a linear gate.
    noisy : bool
        Whether to add learned noise to the logits during training.

    Example
    -------
    >>> router = Router(16, 4, hidden_size=8)
    >>> router(torch.randn(5, 16)).shape
    torch.Size([5, 4])
    """

    def __init__(self, input_size, num_experts, hidden_size=None, noisy=False):
        super().__init__()
        if hidden_size is None:
            self.net = nn.Linear(input_size, num_experts)
        else:
            if hidden_size < 1:
                raise ValueError(f"gate_hidden_size must be >= 1 or None, got {hidden_size}")
            self.net = nn.Sequential(
                nn.Linear(input_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, num_experts)
            )
        self.noise = None
        if noisy:
            self.noise = nn.Linear(input_size, num_experts)
            nn.init.zeros_(self.noise.weight)
            nn.init.zeros_(self.noise.bias)

    def forward(self, x):
        """Logits [M, N] in float32 or wider, in the weights' precision even under autocast.

        A bf16 router flips the top-k choice of frames whose best experts are close, a
        discrete change of the layer's output; the router is a tiny GEMM, so float32 is cheap.
        """
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self._logits(x.to(self.weight_dtype))
        return self._logits(x.to(self.weight_dtype))

    def _logits(self, x):
        logits = _at_least_float32(self.net(x))
        if self.noise is not None and self.training:
            scale = F.softplus(_at_least_float32(self.noise(x)))
            logits = logits + torch.randn_like(logits) * scale
        return logits

    @property
    def weight_dtype(self):
        """Dtype of the router's own weights (float32 unless the model was cast)."""
        first = self.net if isinstance(self.net, nn.Linear) else self.net[0]
        return first.weight.dtype
