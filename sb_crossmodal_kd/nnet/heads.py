"""Auxiliary output heads: small classifiers on encoder layers, used only in training.

Each head (Lee and Chang 2021's "auxiliary output layers") reads one tapped encoder layer
(see :mod:`sb_crossmodal_kd.nnet.taps`), predicts one unit type per frame, and carries the
settings of its losses: the distillation weight ``alpha`` and temperature ``tau`` for the KL
to its unit LM teacher (``tau`` softens both: the head's logits, and the teacher, whose cache
must be built at the same ``tau``), and an optional hard-label loss of its own (``frame_ce``
on the aligned units, ``ctc`` on the unit sequence, or ``none``) with its weight.

The heads of a model live in one :class:`AuxiliaryHeads` container, so that the inference
model is the training model minus that one entry (:func:`inference_modules`).

Example
-------
>>> import torch
>>> heads = AuxiliaryHeads(
...     senone=AuxiliaryHead("senone", layer=1, input_size=16, n_units=50),
...     subword=AuxiliaryHead("subword", layer=3, input_size=16, n_units=30,
...                           hidden_size=32, loss="ctc", alpha=0.5, tau=2.0),
... )
>>> heads.layers
[1, 3]
>>> logits = heads({1: torch.rand(2, 7, 16), 3: torch.rand(2, 7, 16)})
>>> logits["senone"].shape, logits["subword"].shape
(torch.Size([2, 7, 50]), torch.Size([2, 7, 31]))
>>> modules = torch.nn.ModuleDict({"enc": torch.nn.Linear(16, 16), "heads": heads})
>>> sorted(inference_modules(modules))
['enc']
"""

import torch

from sb_crossmodal_kd.distributed import unwrap

__all__ = ["AuxiliaryHead", "AuxiliaryHeads", "inference_modules", "HEAD_LOSSES"]

HEAD_LOSSES = ("frame_ce", "ctc", "none")


class AuxiliaryHead(torch.nn.Module):
    """One auxiliary output layer: a projection from a tapped layer to unit logits.

    Arguments
    ---------
    unit_type : str
        Name of the unit type it predicts (``senone``, ``monophone``, ``subword``, ...); the
        key under which batches carry this unit type's alignment, sequence and teacher.
    layer : int
        Encoder layer it reads (numbering of :class:`~sb_crossmodal_kd.nnet.taps.EncoderTaps`).
    input_size : int
        Feature size of that layer's output.
    n_units : int
        Size of the unit vocabulary ``V_u`` (the teacher's vocabulary).
    hidden_size : int, optional
        If given, the projection is a small MLP (linear, activation, dropout, linear);
        otherwise a single linear layer.
    dropout : float
        Dropout before the projection (and inside the MLP).
    activation : type
        Activation class of the MLP.
    loss : str
        Hard-label loss of this head: ``frame_ce`` (cross-entropy on the unit aligned to each
        frame), ``ctc`` (CTC on the unit sequence; adds a blank output, see ``blank_index``)
        or ``none`` (distillation only).
    loss_weight : float
        Weight of the hard-label loss in the total.
    alpha : float
        Weight of the distillation term ``KL(teacher || head)``; 0 disables it.
    tau : float
        Temperature of the distillation term, on both sides: it divides the head's logits,
        and the teacher's distribution must be the teacher's at this temperature (its cache
        built with it; a cache of another temperature is refused before training).

    Example
    -------
    >>> head = AuxiliaryHead("monophone", layer=2, input_size=8, n_units=40, loss="ctc")
    >>> head.n_outputs, head.blank_index
    (41, 40)
    >>> head.unit_logits(head(torch.rand(1, 5, 8))).shape
    torch.Size([1, 5, 40])
    """

    def __init__(
        self,
        unit_type,
        layer,
        input_size,
        n_units,
        hidden_size=None,
        dropout=0.0,
        activation=torch.nn.ReLU,
        loss="none",
        loss_weight=1.0,
        alpha=1.0,
        tau=1.0,
    ):
        super().__init__()
        if loss not in HEAD_LOSSES:
            raise ValueError(
                f"Auxiliary head '{unit_type}': loss '{loss}' is not one of {HEAD_LOSSES}."
            )
        if tau <= 0:
            raise ValueError(f"Auxiliary head '{unit_type}': tau must be > 0, got {tau}.")
        if alpha < 0 or loss_weight < 0:
            raise ValueError(
                f"Auxiliary head '{unit_type}': alpha ({alpha}) and loss_weight "
                f"({loss_weight}) must be >= 0."
            )
        self.unit_type = str(unit_type)
        self.layer = int(layer)
        self.n_units = int(n_units)
        self.loss = loss
        self.loss_weight = float(loss_weight)
        self.alpha = float(alpha)
        self.tau = float(tau)
        # The CTC blank goes last, so unit ids index the head's outputs unchanged.
        self.blank_index = self.n_units if loss == "ctc" else None
        self.n_outputs = self.n_units + (1 if loss == "ctc" else 0)
        layers = [torch.nn.Dropout(dropout)] if dropout > 0 else []
        if hidden_size:
            layers += [
                torch.nn.Linear(input_size, hidden_size),
                activation(),
                torch.nn.Dropout(dropout),
                torch.nn.Linear(hidden_size, self.n_outputs),
            ]
        else:
            layers.append(torch.nn.Linear(input_size, self.n_outputs))
        self.projection = torch.nn.Sequential(*layers)

    def forward(self, hidden):
        """Maps a tapped layer ``[B, T, input_size]`` to logits ``[B, T, n_outputs]``."""
        return self.projection(hidden)

    def unit_logits(self, logits):
        """The logits over the unit vocabulary only (drops the CTC blank; a view)."""
        return logits[..., : self.n_units]

    def extra_repr(self):
        return (
            f"unit_type={self.unit_type!r}, layer={self.layer}, n_units={self.n_units}, "
            f"loss={self.loss!r}, loss_weight={self.loss_weight}, alpha={self.alpha}, "
            f"tau={self.tau}"
        )


class AuxiliaryHeads(torch.nn.ModuleDict):
    """All auxiliary heads of a model, by name; dropped as a whole for inference.

    Arguments
    ---------
    heads : dict of AuxiliaryHead, optional
        Heads by name (a name is usually the unit type; two heads may share a unit type).
    **kwargs : AuxiliaryHead or None
        More heads by name (convenient from hyperpyyaml). A head given as ``None`` is left
        out, so an ablation drops a level by overriding it with ``null``.

    Example
    -------
    >>> heads = AuxiliaryHeads({"mono": AuxiliaryHead("monophone", 2, 8, 40)}, senone=None)
    >>> heads.layers, heads.unit_types, len(heads)
    ([2], ['monophone'], 1)
    """

    def __init__(self, heads=None, **kwargs):
        merged = dict(heads or {})
        merged.update(kwargs)
        merged = {name: head for name, head in merged.items() if head is not None}
        for name, head in merged.items():
            if not isinstance(head, AuxiliaryHead):
                raise TypeError(
                    f"Auxiliary head '{name}' is a {type(head).__name__}; expected an "
                    "AuxiliaryHead (in hparams: !new:sb_crossmodal_kd.nnet.heads.AuxiliaryHead)."
                )
        super().__init__(merged)

    @property
    def layers(self):
        """Sorted encoder layers the heads read (what to tap)."""
        return sorted({head.layer for head in self.values()})

    @property
    def unit_types(self):
        """Sorted unit types the heads predict (what the batches must carry)."""
        return sorted({head.unit_type for head in self.values()})

    def forward(self, hidden):
        """Applies every head to its layer.

        Arguments
        ---------
        hidden : dict of int to torch.Tensor
            Tapped layers ``{layer: [B, T, D]}``, e.g. from ``EncoderTaps``.

        Returns
        -------
        dict of str to torch.Tensor
            Logits ``[B, T, n_outputs]`` by head name.
        """
        logits = {}
        for name, head in self.items():
            if head.layer not in hidden:
                raise KeyError(
                    f"Auxiliary head '{name}' reads encoder layer {head.layer}, which was not "
                    f"tapped (tapped: {sorted(hidden)}). Build the taps with "
                    "layers=heads.layers."
                )
            logits[name] = head(hidden[head.layer])
        return logits


def _is_auxiliary(module):
    return isinstance(module, AuxiliaryHeads | AuxiliaryHead)


def inference_modules(modules):
    """The modules of the inference model: the training modules minus auxiliary heads.

    The heads exist only for training. Pass the Brain's ``modules``
    (a dict or ModuleDict, as in hparams); entries that are heads are left out. Heads
    nested inside another module cannot be left out safely, so they raise an error.

    Arguments
    ---------
    modules : dict or torch.nn.ModuleDict
        Modules by name.

    Returns
    -------
    torch.nn.ModuleDict
        The same module objects (not copies) without the heads; its ``state_dict()`` is
        what to export.

    Example
    -------
    >>> heads = AuxiliaryHeads(sub=AuxiliaryHead("subword", 1, 4, 10))
    >>> modules = {"enc": torch.nn.Linear(4, 4), "heads": heads}
    >>> sorted(inference_modules(modules).state_dict())
    ['enc.bias', 'enc.weight']
    """
    kept = torch.nn.ModuleDict()
    for name, module in dict(modules).items():
        module = unwrap(module)  # as trained under DDP: the modules are wrapped
        if _is_auxiliary(module):
            continue
        if isinstance(module, torch.nn.Module):
            nested = [n for n, m in module.named_modules() if _is_auxiliary(m)]
            if nested:
                raise ValueError(
                    f"Module '{name}' contains auxiliary heads at {nested}; declare the "
                    "AuxiliaryHeads as a top-level entry of `modules` so that inference can "
                    "leave it out."
                )
        kept[name] = module
    return kept
