"""Deep mixture of experts (Eigen et al. 2013): a stack of MoE layers, each with its own gate.

Layer ``l + 1`` gates and computes on the mixed output of layer ``l``; with N experts per
layer and L layers the stack has N^L expert combinations (paths). The stack is an encoder:
it takes [batch, time, features] from a front-end and returns the last layer's output and
every layer's output, so auxiliary heads can tap intermediate depths.
"""

import math

from torch import nn

from sb_crossmodal_kd.lengths import lengths_to_mask
from sb_crossmodal_kd.nnet.moe import MoE


def _per_layer(value, num_layers, name):
    """Expands an int (or None) to one value per layer; checks a list's length."""
    if isinstance(value, list | tuple):
        if len(value) != num_layers:
            raise ValueError(
                f"{name} has {len(value)} entries but num_layers={num_layers}: give one per "
                "layer or a single value"
            )
        return list(value)
    return [value] * num_layers


class DeepMoE(nn.Module):
    """A stack of :class:`~sb_crossmodal_kd.nnet.moe.MoE` layers used as an encoder.

    Arguments
    ---------
    input_size : int
        Feature size of the input (e.g. the front-end's output size).
    num_layers : int
        Number of MoE layers L.
    layer_size : int or list of int
        Output size of each layer (the paper's expert width).
    num_experts : int or list of int
        Experts per layer.
    expert : str
        Expert type (see :class:`~sb_crossmodal_kd.nnet.moe.StackedExperts`); "relu" is
        the paper's single rectified linear layer.
    expert_hidden_size : int, optional
        Inner size of "ffn" / "swiglu" experts.
    top_k : int or list, optional
        None for the paper's dense softmax gating, else sparse top-k routing.
    gate_hidden_size : int or list, optional
        Hidden size of each gating network (None: linear gate).
    dropout : float
        Dropout on each layer's output.
    residual : bool
        Add each layer's input to its output (where sizes match): helps deeper stacks.
    layer_norm : bool
        Layer-normalise each layer's output.
    **moe_kwargs
        Passed to every MoE layer (load_balancing_weight, z_loss_weight, balance_margin,
        balance_epochs, balance_steps, noisy_gating, capacity_factor, kernel, ...).

    Example
    -------
    >>> import torch
    >>> encoder = DeepMoE(40, num_layers=2, layer_size=32, num_experts=4)
    >>> out, layers = encoder(torch.randn(2, 10, 40), lengths=torch.tensor([1.0, 0.5]))
    >>> out.shape, len(layers), encoder.num_combinations
    (torch.Size([2, 10, 32]), 2, 16)
    """

    def __init__(
        self,
        input_size,
        num_layers=2,
        layer_size=256,
        num_experts=4,
        expert="relu",
        expert_hidden_size=None,
        top_k=None,
        gate_hidden_size=None,
        dropout=0.0,
        residual=False,
        layer_norm=False,
        **moe_kwargs,
    ):
        super().__init__()
        if num_layers is None or num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        sizes = _per_layer(layer_size, num_layers, "layer_size")
        experts = _per_layer(num_experts, num_layers, "num_experts")
        top_ks = _per_layer(top_k, num_layers, "top_k")
        gate_sizes = _per_layer(gate_hidden_size, num_layers, "gate_hidden_size")
        hidden = _per_layer(expert_hidden_size, num_layers, "expert_hidden_size")
        self.residual = residual
        self.layers = nn.ModuleList()
        self.norms = nn.ModuleList()
        in_size = input_size
        for size, n, k, gate, inner in zip(sizes, experts, top_ks, gate_sizes, hidden,
                                           strict=True):
            self.layers.append(
                MoE(in_size, n, output_size=size, expert=expert, expert_hidden_size=inner,
                    top_k=k, gate_hidden_size=gate, **moe_kwargs)
            )
            self.norms.append(nn.LayerNorm(size) if layer_norm else nn.Identity())
            in_size = size
        self.dropout = nn.Dropout(dropout)
        self.input_size = input_size
        self.output_size = in_size

    @property
    def num_combinations(self):
        """Number of expert paths through the stack, the product of the expert counts."""
        return math.prod(layer.num_experts for layer in self.layers)

    def forward(self, src, lengths=None, mask=None, src_key_padding_mask=None):
        """Runs the stack.

        Arguments
        ---------
        src : torch.Tensor
            [B, T, input_size]
        lengths : torch.Tensor, optional
            [B] SpeechBrain relative lengths.
        mask : torch.Tensor, optional
            [B, T] bool, True on real frames.
        src_key_padding_mask : torch.Tensor, optional
            [B, T] bool, True on padding (SpeechBrain's encoder convention).

        Returns
        -------
        output : torch.Tensor
            [B, T, output_size], zero on padding frames.
        layer_outputs : list of torch.Tensor
            Each layer's output [B, T, layer_size], first layer first.
        """
        if mask is None and src_key_padding_mask is not None:
            mask = ~src_key_padding_mask.bool()
        if mask is None and lengths is not None:
            mask = lengths_to_mask(lengths.to(src.device), src.shape[1])
        x = src
        layer_outputs = []
        for layer, norm in zip(self.layers, self.norms, strict=True):
            y = layer(x, mask=mask)
            if self.residual and y.shape[-1] == x.shape[-1]:
                y = y + x
            y = self.dropout(norm(y))
            if mask is not None:  # keep padding at zero whatever norm and residual did
                y = y * mask.unsqueeze(-1).to(y.dtype)
            layer_outputs.append(y)
            x = y
        return x, layer_outputs


class DeepMoEClassifier(nn.Module):
    """The paper's frame classifier: a Deep MoE followed by a linear output layer.

    Arguments
    ---------
    input_size : int
        Input feature size.
    num_classes : int
        Output classes.
    **dmoe_kwargs
        Passed to :class:`DeepMoE`.

    Example
    -------
    >>> import torch
    >>> model = DeepMoEClassifier(40, 10, num_layers=2, layer_size=16, num_experts=2)
    >>> model(torch.randn(2, 5, 40)).shape
    torch.Size([2, 5, 10])
    """

    def __init__(self, input_size, num_classes, **dmoe_kwargs):
        super().__init__()
        self.encoder = DeepMoE(input_size, **dmoe_kwargs)
        self.output = nn.Linear(self.encoder.output_size, num_classes)

    def forward(self, x, lengths=None, mask=None):
        """Logits [B, T, num_classes] (log-softmax them for the paper's softmax output)."""
        hidden, _ = self.encoder(x, lengths=lengths, mask=mask)
        return self.output(hidden)


class DeepMoECTCEncoder(nn.Module):
    """A Deep MoE encoder behind the project's convolutional front end, called like
    :class:`~sb_crossmodal_kd.nnet.conformer.ConformerCTCEncoder`:
    ``encoder(features, lengths) -> [B, T', d_model]``, so the CTC Brains, taps and heads
    take it in place of the Conformer.

    Front end: SpeechBrain's ``ConvolutionFrontEnd`` with two stride-2 blocks (4x time
    subsampling), then a linear projection to ``d_model``; then ``num_layers`` MoE layers of
    width ``d_model`` with residual connections and layer norm.

    Arguments
    ---------
    n_mels : int
        Input filterbank size.
    d_model : int
        Width of every MoE layer.
    num_layers : int
        MoE layers.
    num_experts : int or list
        Experts per layer.
    front_channels : tuple of int
        Channels of the two convolution blocks.
    dropout : float
        Dropout on each layer's output.
    **dmoe_kwargs
        Further :class:`DeepMoE` settings (expert, expert_hidden_size, top_k, balance_margin,
        load_balancing_weight, ...).

    Example
    -------
    >>> import torch
    >>> encoder = DeepMoECTCEncoder(n_mels=20, d_model=16, num_layers=2, num_experts=2)
    >>> encoder(torch.randn(2, 41, 20), torch.tensor([1.0, 0.5])).shape
    torch.Size([2, 11, 16])
    """

    def __init__(self, n_mels=80, d_model=144, num_layers=4, num_experts=4,
                 front_channels=(32, 32), dropout=0.1, **dmoe_kwargs):
        super().__init__()
        from sb_crossmodal_kd.nnet.conformer import SubsamplingFrontEnd

        self.front_end = SubsamplingFrontEnd(n_mels, d_model, front_channels)
        dmoe_kwargs.setdefault("residual", True)
        dmoe_kwargs.setdefault("layer_norm", True)
        self.layers = DeepMoE(d_model, num_layers=num_layers, layer_size=d_model,
                              num_experts=num_experts, dropout=dropout, **dmoe_kwargs)

    def forward(self, features, lengths):
        """Encodes ``features`` [B, T, n_mels] with relative ``lengths`` [B] -> [B, T', D]."""
        out, _ = self.layers(self.front_end(features), lengths=lengths)
        return out
