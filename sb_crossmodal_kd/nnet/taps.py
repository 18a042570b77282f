"""Intermediate layer outputs ("taps") of encoders, without forking their code.

Auxiliary heads sit on encoder layers below the output (hierarchical distillation). SpeechBrain's
encoders only return their final output, so :class:`EncoderTaps` registers forward hooks on
the encoder's layer modules and keeps a *reference* to what chosen layers returned during a
forward pass: no copy, no device sync, gradients flow through the tapped tensors.

Layer numbering follows the notation ``h^l`` of the method: layer ``l`` (1-based) is the
output of the ``l``-th layer, layer ``0`` is the encoder's input, ``-1`` the last layer.
For Conformer and Transformer encoders the last layer's tap is taken *before* the encoder's
final LayerNorm (the encoder's own output is after it).

Which modules count as layers (see :func:`encoder_layers`):

* ``speechbrain.lobes.models.CRDNN.CRDNN``: its CNN blocks, the projection (if any), the
  recurrent module(s) (and the linear projections between them with ``use_rnnp``), then its
  DNN blocks; pooling and dropout are not layers. CNN block outputs ``[B, T, F, C]`` are
  flattened to ``[B, T, F * C]`` (a view). Note CRDNN's optional time pooling comes after
  the CNN blocks, so CNN taps then have more frames than the output;
* our :class:`~sb_crossmodal_kd.nnet.dmoe.DeepMoE`: it returns ``(output, [h^1..h^L])``, and
  the taps are those returned per-layer outputs (after each layer's residual and norm);
* any encoder with a ``layers`` ModuleList (SpeechBrain's ``ConformerEncoder`` and
  ``TransformerEncoder``);
* a wrapper whose ``layers`` attribute is one of the above (e.g. ``ConformerCTCEncoder``),
  or, without ``layers``, whose ``encoder`` attribute is (SpeechBrain's ``TransformerASR``,
  conformer or transformer); layer 0 is then the input of that inner module, at the layers'
  frame rate.

A layer that returns a tuple (Conformer layers return ``(output, attention)``) is tapped on
its first element. With layerdrop, a dropped layer ``l`` has ``h^l = h^{l-1}``, which is what
the tap returns.

Example
-------
>>> import torch
>>> from speechbrain.lobes.models.transformer.Conformer import ConformerEncoder
>>> encoder = ConformerEncoder(num_layers=3, d_model=16, d_ffn=32, nhead=2,
...                            attention_type="regularMHA")
>>> taps = EncoderTaps(encoder, layers=[1, 3])
>>> output, hidden = taps(torch.rand(2, 7, 16))
>>> output.shape, sorted(hidden), hidden[1].shape
(torch.Size([2, 7, 16]), [1, 3], torch.Size([2, 7, 16]))

Used as a context around any code that runs the encoder (e.g. inside a larger model):

>>> with taps.capture() as hidden:
...     _ = encoder(torch.rand(2, 5, 16))
>>> hidden[3].shape
torch.Size([2, 5, 16])
"""

import contextlib

import torch

__all__ = ["EncoderTaps", "encoder_layers", "describe_layers"]

# Children of a CRDNN that transform features but are not "layers" of the network.
_CRDNN_SKIP = ("Pooling", "Dropout")


def _crdnn_layers(crdnn):
    layers = []
    for name, child in crdnn.items():
        if name in ("CNN", "DNN"):
            layers.extend(child.values())
        elif any(skip in type(child).__name__ for skip in _CRDNN_SKIP):
            continue
        elif len(list(child.parameters())) == 0:
            # e.g. the empty "RNN" container SpeechBrain creates when use_rnnp=True
            continue
        else:
            layers.append(child)
    return layers


def _returns_layer_outputs(module):
    """Whether ``module`` returns ``(output, [h^1, ..., h^L])`` (our Deep MoE stack does)."""
    from sb_crossmodal_kd.nnet.dmoe import DeepMoE

    return isinstance(module, DeepMoE)


def _layer_owner(encoder):
    """``(module that runs the layers, its ordered layers, returns_layer_outputs)``."""
    from speechbrain.lobes.models.CRDNN import CRDNN

    if isinstance(encoder, CRDNN):
        return encoder, _crdnn_layers(encoder), False
    layers = getattr(encoder, "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        return encoder, list(layers), _returns_layer_outputs(encoder)
    if isinstance(layers, torch.nn.Module):  # a wrapper whose `layers` is the encoder proper
        return _layer_owner(layers)
    inner = getattr(encoder, "encoder", None)
    if layers is None and isinstance(inner, torch.nn.Module):  # e.g. TransformerASR
        return _layer_owner(inner)
    raise TypeError(
        f"Cannot find the layers of a {type(encoder).__name__}: taps support SpeechBrain's "
        "ConformerEncoder, TransformerEncoder and CRDNN, our DeepMoE, and any module with a "
        "`layers` ModuleList (or a `layers` or `encoder` module that has one). Give your "
        "encoder a `layers` ModuleList."
    )


def encoder_layers(encoder):
    """Returns the ordered list of tappable layer modules of ``encoder``.

    Arguments
    ---------
    encoder : torch.nn.Module
        A SpeechBrain ConformerEncoder / TransformerEncoder / CRDNN, any module with a
        ``layers`` ModuleList, or a wrapper whose ``layers`` (or ``encoder``) attribute is
        such a module (e.g. ``ConformerCTCEncoder``, ``TransformerASR``).

    Returns
    -------
    list of torch.nn.Module
        Layer ``l`` (1-based) is element ``l - 1``.

    Example
    -------
    >>> from speechbrain.lobes.models.CRDNN import CRDNN
    >>> crdnn = CRDNN(input_size=20, cnn_blocks=1, cnn_channels=[4], rnn_layers=1,
    ...               rnn_neurons=8, dnn_blocks=2, dnn_neurons=8)
    >>> [type(m).__name__ for m in encoder_layers(crdnn)]
    ['CNN_Block', 'LiGRU', 'DNN_Block', 'DNN_Block']
    """
    return _layer_owner(encoder)[1]


def describe_layers(encoder):
    """Lists ``(layer index, module type)`` to help choose tap layers in hparams.

    Example
    -------
    >>> from speechbrain.lobes.models.transformer.Transformer import TransformerEncoder
    >>> describe_layers(TransformerEncoder(num_layers=2, nhead=2, d_ffn=8, d_model=4))
    [(0, 'input'), (1, 'TransformerEncoderLayer'), (2, 'TransformerEncoderLayer')]
    """
    return [(0, "input")] + [
        (i + 1, type(m).__name__) for i, m in enumerate(encoder_layers(encoder))
    ]


def _as_frames(output):
    """The tensor a layer's output stands for, as ``[B, T, D]``."""
    if isinstance(output, tuple | list):
        output = output[0]
    if output.dim() == 4:  # CNN block: [B, T, F, C] -> [B, T, F * C], a view when contiguous
        output = output.flatten(start_dim=2)
    return output


class EncoderTaps:
    """Taps the outputs of chosen layers of an encoder during its forward pass.

    A plain object, not a ``torch.nn.Module``: it owns no parameters and never appears in a
    state_dict, so models with and without taps checkpoint identically. Hooks are registered
    once, at construction, and only record while a capture is active.

    Arguments
    ---------
    encoder : torch.nn.Module
        The encoder to tap (see :func:`encoder_layers` for what counts as a layer).
    layers : list of int
        Layer indices to tap: ``1..L`` the layers' outputs, ``0`` the layers' input,
        negative indices count from the last layer (``-1`` is layer ``L``).

    Example
    -------
    >>> import torch
    >>> from speechbrain.lobes.models.transformer.Transformer import TransformerEncoder
    >>> encoder = TransformerEncoder(num_layers=2, nhead=2, d_ffn=8, d_model=4)
    >>> taps = EncoderTaps(encoder, layers=[0, -1])
    >>> taps.layers
    [0, 2]
    >>> x = torch.rand(1, 3, 4)
    >>> _, hidden = taps(x)
    >>> hidden[0] is x
    True
    """

    def __init__(self, encoder, layers):
        self.encoder = encoder
        # Layer 0 is the input of the module that runs the layers (for a wrapper such as
        # ConformerCTCEncoder: after its front end, at the layers' frame rate).
        owner, self.layer_modules, returned = _layer_owner(encoder)
        n = len(self.layer_modules)
        resolved = []
        for layer in layers:
            index = int(layer)
            if index < 0:
                index += n + 1
            if not 0 <= index <= n:
                raise ValueError(
                    f"Tap layer {layer} is out of range for a {type(encoder).__name__} with "
                    f"{n} layers: use 0 (input), 1..{n}, or -1..-{n} (see describe_layers)."
                )
            resolved.append(index)
        self.layers = sorted(set(resolved))
        self._wanted = frozenset(self.layers)
        self._recording = None
        self._last = None
        self._handles = []
        deepest = max(self.layers, default=0)
        if self.layers:
            self._handles.append(
                owner.register_forward_pre_hook(self._input_hook, with_kwargs=True)
            )
        if returned and deepest > 0:
            # The stack returns every layer's finished output (after its residual, norm and
            # padding mask), which a hook on the bare layer module would not see.
            self._handles.append(owner.register_forward_hook(self._returned_hook))
            deepest = 0
        # Hook every layer up to the deepest tap, so that a layer skipped by layerdrop can
        # fall back to the last layer that did run.
        for index in range(1, deepest + 1):
            self._handles.append(
                self.layer_modules[index - 1].register_forward_hook(self._make_hook(index))
            )

    def _input_hook(self, module, args, kwargs):
        if self._recording is not None:
            source = args[0] if args else kwargs.get("src", next(iter(kwargs.values())))
            self._last = (0, _as_frames(source))
            if 0 in self._wanted:
                self._recording[0] = self._last[1]

    def _returned_hook(self, module, args, output):
        if self._recording is not None:
            layer_outputs = output[1]
            for layer in self.layers:
                if layer > 0:
                    self._recording[layer] = layer_outputs[layer - 1]
            self._last = (len(layer_outputs), layer_outputs[-1])

    def _make_hook(self, index):
        def hook(module, args, output):
            if self._recording is not None:
                self._fill_skipped(below=index)
                self._last = (index, _as_frames(output))
                if index in self._wanted:
                    self._recording[index] = self._last[1]

        return hook

    def _fill_skipped(self, below):
        """Tapped layers after the last one that ran and before ``below`` were dropped
        (layerdrop), so their output is the last output: ``h^l = h^{l-1}``."""
        last_index, last_output = self._last
        for layer in self.layers:
            if last_index < layer < below:
                self._recording[layer] = last_output

    @contextlib.contextmanager
    def capture(self):
        """Context in which forward passes of the encoder record the tapped layers.

        Yields a dict ``{layer: tensor [B, T, D]}`` that fills as the encoder runs (usable
        inside the block, complete after it). If the encoder runs several times inside one
        capture, the last run wins.
        """
        if self._recording is not None:
            raise RuntimeError("EncoderTaps.capture() is already active; captures do not nest.")
        hidden = {}
        self._recording = hidden
        self._last = None
        try:
            yield hidden
            if self._last is not None:
                self._fill_skipped(below=len(self.layer_modules) + 1)
        finally:
            self._recording = None
            self._last = None

    def __call__(self, *args, **kwargs):
        """Runs the encoder; returns ``(final_output, {layer: tensor [B, T, D]})``.

        ``final_output`` is the encoder's output, or its first element when the encoder
        returns a tuple (Conformer/Transformer return ``(output, attentions)``).
        """
        with self.capture() as hidden:
            output = self.encoder(*args, **kwargs)
        if isinstance(output, tuple | list):
            output = output[0]
        return output, hidden

    def remove(self):
        """Detaches the hooks from the encoder."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __repr__(self):
        return f"EncoderTaps({type(self.encoder).__name__}, layers={self.layers})"
