"""The balancing constraint of Eigen et al. (2013), which keeps every expert in use."""

import torch
from torch import nn

from sb_crossmodal_kd.distributed import is_distributed, sum_across_processes


class BalancingConstraint(nn.Module):
    """The paper's constraint that keeps every expert in use during a first training phase.

    Keeps per-expert running totals ``G_i`` of the gate mass each expert has received. While
    active, an expert with ``G_i - min_j G_j > margin`` gets gate 0 and the gate is
    renormalised. The paper decides example by example; here frames are taken in chunks of
    ``chunk_size`` (default: the whole batch), each decided from the totals left by the
    previous chunks, so the spread ``max G - min G`` stays below ``margin + chunk_size``.
    ``chunk_size=1`` is the paper's rule exactly (and a Python loop over frames).

    Only differences between totals matter, so they are stored relative to their minimum:
    they stay small and exact in float32 however long training runs.

    Under DDP each process decides its own frames from the totals shared at the start of the
    batch, then the mass of all processes is added (one all-reduce per batch), so every rank
    holds the same totals; the spread bound becomes ``margin + world_size * chunk_size``.

    The constraint is active in training mode up to and including epoch ``phase_epochs``
    (1-based, as SpeechBrain counts; set with :func:`set_moe_epoch`) and for the first
    ``phase_steps`` training batches; with neither it is always active. State (totals, steps,
    epoch) is in ``state_dict``: totals as a buffer, counters as extra state, so SpeechBrain's
    Checkpointer saves and restores them with the model that holds the layer.

    Arguments
    ---------
    num_experts : int
        Number of experts.
    margin : float
        Margin m >= 0, in units of gate mass (one frame gives mass 1 in total).
    phase_epochs : int, optional
        Last epoch of phase one.
    phase_steps : int, optional
        Number of training batches of phase one.
    chunk_size : int, optional
        Frames decided together (None: the whole batch).

    Example
    -------
    >>> constraint = BalancingConstraint(3, margin=0.5).train()
    >>> probs = torch.tensor([[0.8, 0.1, 0.1], [0.8, 0.1, 0.1]])
    >>> constraint(probs, torch.tensor([True, True]))
    tensor([[0.8000, 0.1000, 0.1000],
            [0.8000, 0.1000, 0.1000]])
    >>> constraint(probs, torch.tensor([True, True]))  # expert 0 is now 1.4 ahead: off
    tensor([[0.0000, 0.5000, 0.5000],
            [0.0000, 0.5000, 0.5000]])
    """

    def __init__(self, num_experts, margin, phase_epochs=None, phase_steps=None,
                 chunk_size=None):
        super().__init__()
        if margin is None or margin < 0:
            raise ValueError(f"balance_margin must be >= 0, got {margin}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"balance_chunk_size must be >= 1 or None, got {chunk_size}")
        self.chunk_size = chunk_size
        for name, value in (("balance_epochs", phase_epochs), ("balance_steps", phase_steps)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {value}")
        self.margin = float(margin)
        self.phase_epochs = phase_epochs
        self.phase_steps = phase_steps
        self.register_buffer("totals", torch.zeros(num_experts))
        self.steps = 0
        self.epoch = 0

    @property
    def active(self):
        """Whether the constraint applies to the next training batch."""
        if not self.training:
            return False
        if self.phase_steps is not None and self.steps >= self.phase_steps:
            return False
        return self.phase_epochs is None or self.epoch <= self.phase_epochs

    # Outside torch.compile's graph: the phase is decided on Python counters, which a graph
    # would guard on (a recompilation at every step); a graph break here costs far less.
    @torch.compiler.disable
    def forward(self, probs, valid, select=None):
        """Constrains gate distributions and adds the gate mass used to the running totals.

        Arguments
        ---------
        probs : torch.Tensor
            [M, N] gate distributions.
        valid : torch.Tensor or None
            [M] bool, False on padding (not counted); None when every frame is real.
        select : callable, optional
            Maps constrained distributions [c, N] to the gates actually used [c, N] (e.g.
            top-k, renormalised); default: the distributions themselves.

        Returns
        -------
        torch.Tensor
            [M, N] constrained, renormalised distributions (``probs`` itself when inactive).
        """
        if not self.active:
            return probs
        if valid is None:
            valid = torch.ones(probs.shape[0], dtype=torch.bool, device=probs.device)
        size = self.chunk_size or max(probs.shape[0], 1)
        pieces = []
        distributed = is_distributed()
        start_totals = self.totals.clone()
        batch_mass = torch.zeros_like(self.totals)
        for start in range(0, probs.shape[0], size):
            piece = self.constrain(probs[start : start + size])
            used = piece if select is None else select(piece)
            self.record(used, valid[start : start + size])
            if distributed:
                batch_mass += self.gate_mass(used, valid[start : start + size])
            pieces.append(piece)
        if distributed:
            # Each process decided its own frames from the shared totals; all then add the
            # mass of every process, so the totals stay identical on all ranks.
            (global_mass,) = sum_across_processes([batch_mass])
            totals = start_totals + global_mass
            self.totals.copy_(totals - totals.min())
        self.steps += 1
        return torch.cat(pieces) if len(pieces) != 1 else pieces[0]

    def constrain(self, probs):
        """Zeroes the gates of experts ahead by more than the margin and renormalises."""
        allowed = (self.totals - self.totals.min()) <= self.margin
        probs = probs * allowed.to(probs.dtype)
        return probs / probs.sum(-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)

    @staticmethod
    @torch.no_grad()
    def gate_mass(gates, valid):
        """Per-expert gate mass [N] of the valid rows of ``gates`` [M, N]."""
        return (gates.float() * valid.unsqueeze(-1).float()).sum(0)

    @torch.no_grad()
    def record(self, gates, valid):
        """Adds the gate mass of the valid rows of ``gates`` [M, N] to the totals."""
        totals = self.totals + self.gate_mass(gates, valid)
        self.totals.copy_(totals - totals.min())

    def get_extra_state(self):
        return {"steps": self.steps, "epoch": self.epoch}

    def set_extra_state(self, state):
        self.steps = int(state["steps"])
        self.epoch = int(state["epoch"])

    def extra_repr(self):
        return (f"margin={self.margin}, phase_epochs={self.phase_epochs}, "
                f"phase_steps={self.phase_steps}, chunk_size={self.chunk_size}")
