"""The acoustic encoder of the CTC recipes: SpeechBrain's Conformer on a convolutional front
end, behind one call ``encoder(features, lengths)``.

SpeechBrain's ``ConformerEncoder`` needs relative positional embeddings and a key padding
mask; this wrapper builds both so that Brains, taps and MoE swaps deal with one module whose
``layers`` attribute is the unmodified SpeechBrain ``ConformerEncoder``.
"""

import torch
from speechbrain.lobes.models.convolution import ConvolutionFrontEnd
from speechbrain.lobes.models.transformer.Conformer import ConformerEncoder
from speechbrain.nnet.attention import RelPosEncXL

from sb_crossmodal_kd.lengths import lengths_to_mask


class SubsamplingFrontEnd(torch.nn.Module):
    """Two stride-2 convolution blocks (4x time subsampling) and a projection to ``d_model``.

    The front end every CTC encoder of the package shares, so that frame-rate utilities
    (:mod:`sb_crossmodal_kd.alignment.framerate`) describe all of them.

    Arguments
    ---------
    n_mels : int
        Feature dimension of the input filterbanks.
    d_model : int
        Output width.
    channels : tuple of int
        Channels of the two convolution blocks.
    dropout : float
        Dropout after each convolution block (SpeechBrain's ``ConvolutionFrontEnd``).

    Example
    -------
    >>> front = SubsamplingFrontEnd(n_mels=40, d_model=32)
    >>> front(torch.randn(3, 101, 40)).shape
    torch.Size([3, 26, 32])
    """

    def __init__(self, n_mels=80, d_model=144, channels=(32, 32), dropout=0.1):
        super().__init__()
        self.convolutions = ConvolutionFrontEnd(
            input_shape=(None, None, n_mels),
            num_blocks=2,
            num_layers_per_block=1,
            out_channels=tuple(channels),
            kernel_sizes=(3, 3),
            strides=(2, 2),
            residuals=(False, False),
            dropout=dropout,
        )
        with torch.no_grad():
            probe = self.convolutions(torch.zeros(1, 8, n_mels))
        self.projection = torch.nn.Linear(probe.shape[2] * probe.shape[3], d_model)

    def forward(self, features):
        """[B, T, n_mels] -> [B, ceil(T/4), d_model]."""
        return self.projection(self.convolutions(features).flatten(start_dim=2))


class ConformerCTCEncoder(torch.nn.Module):
    """Conv front end (4x time subsampling), projection, and a Conformer encoder.

    Arguments
    ---------
    n_mels : int
        Feature dimension of the input filterbanks.
    d_model : int
        Conformer width.
    num_layers : int
        Conformer layers.
    nhead : int
        Attention heads.
    d_ffn : int
        Hidden size of the Conformer feed-forward modules.
    kernel_size : int
        Conformer convolution kernel.
    front_channels : tuple of int
        Channels of the two stride-2 convolution blocks.
    dropout : float
        Dropout inside the Conformer and its front end.
    attention_type : str
        SpeechBrain's: ``"RelPosMHAXL"`` (relative positions, the default) or
        ``"regularMHA"`` (no positional encoding: the convolution modules give the order).

    Example
    -------
    >>> encoder = ConformerCTCEncoder(n_mels=40, d_model=32, num_layers=2, nhead=2, d_ffn=64)
    >>> feats = torch.randn(3, 101, 40)
    >>> out = encoder(feats, torch.tensor([1.0, 0.8, 0.5]))
    >>> out.shape
    torch.Size([3, 26, 32])
    >>> plain = ConformerCTCEncoder(n_mels=40, d_model=32, num_layers=2, nhead=2, d_ffn=64,
    ...                             attention_type="regularMHA")
    >>> plain(feats, torch.tensor([1.0, 0.8, 0.5])).shape, plain.positional is None
    (torch.Size([3, 26, 32]), True)
    """

    def __init__(
        self,
        n_mels=80,
        d_model=144,
        num_layers=4,
        nhead=4,
        d_ffn=576,
        kernel_size=15,
        front_channels=(32, 32),
        dropout=0.1,
        attention_type="RelPosMHAXL",
    ):
        super().__init__()
        self.front_end = SubsamplingFrontEnd(n_mels, d_model, front_channels, dropout)
        self.positional = RelPosEncXL(d_model) if attention_type == "RelPosMHAXL" else None
        self.layers = ConformerEncoder(
            num_layers=num_layers,
            d_model=d_model,
            d_ffn=d_ffn,
            nhead=nhead,
            kernel_size=kernel_size,
            dropout=dropout,
            attention_type=attention_type,
        )

    def forward(self, features, lengths):
        """Encodes ``features`` [B, T, n_mels] with relative ``lengths`` [B] -> [B, T', D]."""
        x = self.front_end(features)
        padding_mask = ~lengths_to_mask(lengths, x.shape[1])
        positions = self.positional(x) if self.positional is not None else None
        out, _ = self.layers(x, src_key_padding_mask=padding_mask, pos_embs=positions)
        return out
