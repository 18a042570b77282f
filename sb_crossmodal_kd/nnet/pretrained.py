"""Pretrained front ends under the package's MoE layers and auxiliary heads.

A front end reads raw audio and returns frames for the layers on top:

- :class:`Wav2Vec2FrontEnd`: a transformers wav2vec 2.0 or WavLM model from a local folder
  (``save_pretrained`` output: ``config.json`` plus weights), frozen or fine-tuned, giving
  its last layer, a chosen hidden layer, or a learnt weighted sum of all of them;
- :class:`SpeechBrainFrontEnd`: any SpeechBrain encoder built in hparams, its weights (and
  its feature normaliser's statistics) loaded from a local folder of ``.ckpt`` files through
  SpeechBrain's ``Pretrainer`` (e.g. a checkpoint of the baseline recipe, or a model folder
  from the SpeechBrain hub copied to disk).

Both are called ``front_end(wavs [B, S], wav_lens [B]) -> (frames [B, T, D], frame_lens
[B])`` with SpeechBrain's relative lengths. :class:`WaveformEncoder` puts layers on top
(e.g. a :class:`~sb_crossmodal_kd.nnet.dmoe.DeepMoE`) and is called like the recipes'
encoders, ``encoder(wavs, wav_lens) -> [B, T, D]``; its ``takes_waveforms`` tells
:class:`~sb_crossmodal_kd.brain.CTCBrain` to hand it the audio instead of filterbanks.
Auxiliary heads tap its layers with :class:`~sb_crossmodal_kd.nnet.taps.EncoderTaps`
(layer 0 is the front end's output).

Nothing is downloaded: folders are read with ``local_files_only`` and SpeechBrain's local
fetching (no symlinks are made).

Frame rate: a front end's ``frames(n_samples)`` is its number of output frames, which
alignments for the heads must match (wav2vec 2.0 and WavLM: one frame per 320 samples, 20 ms
at 16 kHz; this package's Conformer front end: 40 ms).
"""

import contextlib
from pathlib import Path

import torch
from speechbrain.processing.features import InputNormalization

from sb_crossmodal_kd.lengths import absolute_lengths, lengths_to_mask

__all__ = [
    "Wav2Vec2FrontEnd",
    "SpeechBrainFrontEnd",
    "WaveformEncoder",
    "load_speechbrain_checkpoints",
]

# model_type in config.json -> transformers class that loads it (base model, no head).
TRANSFORMERS_MODEL_TYPES = {"wav2vec2": "Wav2Vec2Model", "wavlm": "WavLMModel"}


def _folder_listing(folder, limit=12):
    names = sorted(p.name for p in Path(folder).iterdir())
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{names[:limit]}{more}"


def _local_folder(source, what):
    folder = Path(source)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{what}: {str(source)!r} is not a local folder. Pretrained front ends load from "
            "a folder on disk (nothing is downloaded): copy the model there first."
        )
    return folder


def _masked(frames, lengths):
    """Zeros the padding frames of ``frames`` [B, T, D] given relative ``lengths`` [B]."""
    mask = lengths_to_mask(lengths.to(frames.device), frames.shape[1])
    return frames * mask.unsqueeze(-1).to(frames.dtype)


class _Freezable(torch.nn.Module):
    """Keeps frozen submodules in eval mode (no dropout, no statistics updates) whatever
    ``Brain`` asks of the whole model, and runs them without building a graph."""

    def _frozen_modules(self):
        return []

    def train(self, mode=True):
        """Sets ``mode`` on the module, then puts the frozen parts back in eval mode."""
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self

    def _frozen_context(self):
        return torch.no_grad() if self.freeze else contextlib.nullcontext()


class Wav2Vec2FrontEnd(_Freezable):
    """A transformers wav2vec 2.0 or WavLM model, from a local folder, as a front end.

    Arguments
    ---------
    source : str or Path
        A local folder written by ``save_pretrained`` (``config.json`` whose ``model_type``
        is ``wav2vec2`` or ``wavlm``, plus the weights).
    output_layer : int or str
        ``"last"``: the model's output (after its final layer norm); an int ``l`` in
        ``0..L``: hidden state ``l`` (0 is the input of the first transformer layer);
        ``"weighted"``: a softmax-weighted sum of all ``L + 1`` hidden states with learnt
        weights (SUPERB style; the weights train even when the model is frozen).
    freeze : bool
        No gradient into the pretrained model, which stays in eval mode.
    freeze_feature_encoder : bool
        When fine-tuning (``freeze=False``), keep the convolutional feature encoder fixed
        (the usual practice for wav2vec 2.0 fine-tuning).
    normalize_waveform : bool, optional
        Zero mean, unit variance per utterance over its real samples, as the model's feature
        extractor does. ``None``: ``do_normalize`` of the folder's
        ``preprocessor_config.json`` if there is one, else True.
    config_overrides : dict, optional
        Config values replacing the folder's, passed to ``from_pretrained``: e.g.
        ``{"mask_time_prob": 0.0}`` switches off the model's own SpecAugment, which is
        active when fine-tuning in train mode; ``{"layerdrop": 0.0}`` is needed to pick a
        hidden layer while fine-tuning a model trained with layerdrop.

    Example
    -------
    >>> import tempfile
    >>> from transformers import Wav2Vec2Config, Wav2Vec2Model
    >>> config = Wav2Vec2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
    ...     intermediate_size=32, conv_dim=(8, 8), conv_kernel=(10, 3), conv_stride=(5, 2),
    ...     num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2)
    >>> tmp = tempfile.TemporaryDirectory()
    >>> Wav2Vec2Model(config).save_pretrained(tmp.name)
    >>> front = Wav2Vec2FrontEnd(tmp.name, output_layer=1)
    >>> frames, frame_lens = front(torch.randn(2, 1600), torch.tensor([1.0, 0.5]))
    >>> frames.shape, front.frames(1600), front.output_size
    (torch.Size([2, 159, 16]), 159, 16)
    >>> frame_lens
    tensor([1.0000, 0.4969])
    >>> tmp.cleanup()
    """

    takes_waveforms = True

    def __init__(
        self,
        source,
        output_layer="last",
        freeze=True,
        freeze_feature_encoder=True,
        normalize_waveform=None,
        config_overrides=None,
    ):
        super().__init__()
        from sb_crossmodal_kd.extras import require

        transformers = require("transformers")

        folder = _local_folder(source, "Wav2Vec2FrontEnd")
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"Wav2Vec2FrontEnd: {folder} has no config.json, so it is not a transformers "
                f"model folder (it holds {_folder_listing(folder)})."
            )
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        class_name = TRANSFORMERS_MODEL_TYPES.get(config.model_type)
        if class_name is None:
            raise ValueError(
                f"Wav2Vec2FrontEnd: {folder}/config.json says model_type "
                f"{config.model_type!r} (architectures {getattr(config, 'architectures', None)}),"
                f" expected one of {sorted(TRANSFORMERS_MODEL_TYPES)} (a wav2vec 2.0 or WavLM "
                "speech model)."
            )
        try:
            self.model = getattr(transformers, class_name).from_pretrained(
                folder, local_files_only=True, **(config_overrides or {})
            )
        except OSError as error:
            raise FileNotFoundError(
                f"Wav2Vec2FrontEnd: could not load the {class_name} weights from {folder} "
                f"(it holds {_folder_listing(folder)}): {error}"
            ) from error
        num_layers = self.model.config.num_hidden_layers
        if output_layer not in ("last", "weighted") and not (
            isinstance(output_layer, int) and 0 <= output_layer <= num_layers
        ):
            raise ValueError(
                f"Wav2Vec2FrontEnd: output_layer {output_layer!r} for a model with {num_layers} "
                f"layers; use 'last', 'weighted' or a hidden state 0..{num_layers}."
            )
        self.output_layer = output_layer
        self.layer_weights = None
        if output_layer == "weighted":
            self.layer_weights = torch.nn.Parameter(torch.zeros(num_layers + 1))
        self.freeze = freeze
        self.freeze_feature_encoder = freeze_feature_encoder and not freeze
        if freeze:
            self.model.requires_grad_(False)
        elif self.freeze_feature_encoder:
            self.model.freeze_feature_encoder()
        if normalize_waveform is None:
            normalize_waveform = self._feature_extractor_normalizes(folder)
        # Per utterance over its real samples only (padding must not shift the statistics).
        self.waveform_norm = (
            InputNormalization(norm_type="sentence", avoid_padding_norm=True)
            if normalize_waveform else None
        )
        self.output_size = self.model.config.hidden_size
        self.train()

    @staticmethod
    def _feature_extractor_normalizes(folder):
        import json

        path = folder / "preprocessor_config.json"
        if not path.is_file():
            return True
        return bool(json.loads(path.read_text()).get("do_normalize", True))

    def _frozen_modules(self):
        if self.freeze:
            return [self.model]
        if self.freeze_feature_encoder:
            return [self.model.feature_extractor]
        return []

    def frames(self, n_samples):
        """Number of output frames for ``n_samples`` samples (int, or integer tensor)."""
        frames = self.model._get_feat_extract_output_lengths(n_samples)
        return int(frames) if isinstance(n_samples, int) else frames

    def forward(self, wavs, wav_lens=None):
        """Encodes ``wavs`` [B, S] with relative ``wav_lens`` [B].

        Returns
        -------
        frames : torch.Tensor
            [B, T, output_size], zero on padding frames.
        frame_lens : torch.Tensor
            [B] relative lengths of the frames (from the model's convolution arithmetic).
        """
        if wav_lens is None:
            wav_lens = torch.ones(wavs.shape[0], device=wavs.device)
        n_samples = absolute_lengths(wav_lens, wavs.shape[1])
        if self.waveform_norm is not None:
            wavs = self.waveform_norm(wavs, wav_lens)
        sample_mask = lengths_to_mask(wav_lens, wavs.shape[1])
        wavs = wavs * sample_mask.to(wavs.dtype)
        # transformers' advice: models with group-normalised convolutions (wav2vec2-base,
        # WavLM-base) were trained on zero-padded batches without an attention mask.
        attention_mask = None
        if self.model.config.feat_extract_norm == "layer":
            attention_mask = sample_mask.long()
        hidden_states = self.output_layer != "last"
        with self._frozen_context():
            output = self.model(wavs, attention_mask=attention_mask,
                                output_hidden_states=hidden_states)
        frames = self._select(output)
        frame_lens = (self.frames(n_samples).float() / frames.shape[1]).clamp(max=1.0)
        return _masked(frames, frame_lens), frame_lens

    def _select(self, output):
        if self.output_layer == "last":
            return output.last_hidden_state
        states = output.hidden_states
        expected = self.model.config.num_hidden_layers + 1
        if len(states) != expected:
            raise RuntimeError(
                f"Wav2Vec2FrontEnd got {len(states)} hidden states instead of {expected}: "
                "layerdrop skipped layers; pass config_overrides={'layerdrop': 0.0} to pick "
                "a hidden layer while fine-tuning."
            )
        if self.layer_weights is None:
            return states[self.output_layer]
        weights = torch.softmax(self.layer_weights, dim=0)
        return torch.einsum("l,lbtd->btd", weights.to(states[0].dtype), torch.stack(states))

    def extra_repr(self):
        return (f"{type(self.model).__name__}, output_layer={self.output_layer!r}, "
                f"freeze={self.freeze}")


def _strict_transfer(module, path):
    """Loads a SpeechBrain ``.ckpt`` state dict into ``module``, refusing any mismatch
    (SpeechBrain's default transfer only logs missing and unexpected keys)."""
    from speechbrain.utils.checkpoints import torch_patched_state_dict_load

    state = torch_patched_state_dict_load(path, "cpu")
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise ValueError(
            f"{path} does not fit the {type(module).__name__} built in hparams: {error}"
        ) from error
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path} does not fit the {type(module).__name__} built in hparams: missing keys "
            f"{result.missing_keys[:5]}, unexpected keys {result.unexpected_keys[:5]} "
            f"({len(result.missing_keys)} and {len(result.unexpected_keys)} in all). Build "
            "the module with the settings the checkpoint was trained with."
        )


def load_speechbrain_checkpoints(folder, loadables):
    """Loads SpeechBrain checkpoint files from a local folder with ``Pretrainer``.

    Modules are loaded strictly (every parameter of the module from the file, nothing left
    over); objects with their own SpeechBrain transfer hook (e.g. ``InputNormalization``)
    through that hook. Files are read in place: no collection folder, no symlinks, no
    network.

    Arguments
    ---------
    folder : str or Path
        Local folder holding the files.
    loadables : dict of str to (object, str)
        ``name -> (object to load, file name in folder)``.

    Example
    -------
    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> folder = Path(tmp.name)
    >>> torch.save(torch.nn.Linear(3, 2).state_dict(), folder / "encoder.ckpt")
    >>> linear = torch.nn.Linear(3, 2)
    >>> load_speechbrain_checkpoints(folder, {"encoder": (linear, "encoder.ckpt")})
    >>> load_speechbrain_checkpoints(folder, {"encoder": (torch.nn.Linear(4, 2), "encoder.ckpt")})
    Traceback (most recent call last):
    ...
    ValueError: ... does not fit the Linear built in hparams: ...
    >>> tmp.cleanup()
    """
    from speechbrain.utils.checkpoints import (
        DEFAULT_TRANSFER_HOOKS,
        get_default_hook,
        torch_parameter_transfer,
    )
    from speechbrain.utils.fetching import FetchConfig, FetchFrom, FetchSource, LocalStrategy
    from speechbrain.utils.parameter_transfer import Pretrainer

    folder = _local_folder(folder, "load_speechbrain_checkpoints").absolute()
    missing = [name for _, name in loadables.values() if not (folder / name).is_file()]
    if missing:
        found = sorted(p.name for p in folder.glob("*.ckpt"))
        raise FileNotFoundError(
            f"{folder} has no {missing}: it holds the checkpoint files {found} (a SpeechBrain "
            "checkpoint folder, e.g. save/CKPT+..., names them after its recoverables)."
        )
    objects = {key: obj for key, (obj, _) in loadables.items()}
    hooks = {
        key: _strict_transfer for key, obj in objects.items()
        if get_default_hook(obj, DEFAULT_TRANSFER_HOOKS) is torch_parameter_transfer
    }
    # A FetchSource marks the folder as local, so a missing folder is never taken for a
    # HuggingFace hub ID; without collect_in the files are used where they are.
    paths = {key: FetchSource(FetchFrom.LOCAL, str(folder / name))
             for key, (_, name) in loadables.items()}
    pretrainer = Pretrainer(collect_in=None, loadables=objects, paths=paths, custom_hooks=hooks)
    pretrainer.collect_files(local_strategy=LocalStrategy.NO_LINK,
                             fetch_config=FetchConfig(allow_network=False))
    pretrainer.load_collected()


class SpeechBrainFrontEnd(_Freezable):
    """A SpeechBrain encoder with pretrained weights from a local folder, as a front end.

    The modules are built in hparams exactly as the pretrained model was (its own
    ``hyperparams.yaml`` says how); their weights come from the folder's ``.ckpt`` files
    through :func:`load_speechbrain_checkpoints`. The front end then runs
    ``compute_features -> normalize -> encoder`` on the audio.

    Arguments
    ---------
    encoder : torch.nn.Module
        The encoder, called ``encoder(features, lengths)`` (``pass_lengths``) or
        ``encoder(features)``; a tuple output gives its first element.
    source : str or Path
        Local folder with the checkpoint files.
    checkpoint : str
        The encoder's file in ``source``.
    compute_features : torch.nn.Module, optional
        Waveform to features (e.g. ``Fbank``); None when the encoder reads audio itself.
    normalize : torch.nn.Module, optional
        Feature normaliser called ``normalize(features, lengths)`` (e.g.
        ``InputNormalization``), loaded from ``normalizer_checkpoint``.
    normalizer_checkpoint : str
        The normaliser's file in ``source`` (the SpeechBrain hub names it
        ``normalizer.ckpt``, this package's recipes ``normalize.ckpt``).
    freeze : bool
        No gradient into the pretrained modules, which stay in eval mode (the normaliser
        keeps its pretrained statistics).
    pass_lengths : bool
        Whether the encoder takes the relative lengths as second argument.
    output_size : int, optional
        Frame size, checked by :class:`WaveformEncoder` (default: the encoder's
        ``output_size`` or ``d_model`` attribute, if it has one).

    Example
    -------
    >>> import tempfile
    >>> from speechbrain.lobes.features import Fbank
    >>> from sb_crossmodal_kd.nnet.conformer import ConformerCTCEncoder
    >>> def conformer():
    ...     return ConformerCTCEncoder(n_mels=20, d_model=16, num_layers=1, nhead=2, d_ffn=32)
    >>> tmp = tempfile.TemporaryDirectory()
    >>> folder = Path(tmp.name)
    >>> torch.save(conformer().state_dict(), folder / "encoder.ckpt")
    >>> front = SpeechBrainFrontEnd(conformer(), folder, compute_features=Fbank(n_mels=20),
    ...                             output_size=16)
    >>> frames, frame_lens = front(torch.randn(2, 3200), torch.tensor([1.0, 0.5]))
    >>> frames.shape, front.frames(3200)
    (torch.Size([2, 6, 16]), 6)
    >>> tmp.cleanup()
    """

    takes_waveforms = True

    def __init__(
        self,
        encoder,
        source,
        checkpoint="encoder.ckpt",
        compute_features=None,
        normalize=None,
        normalizer_checkpoint="normalizer.ckpt",
        freeze=True,
        pass_lengths=True,
        output_size=None,
    ):
        super().__init__()
        self.compute_features = compute_features
        self.normalize = normalize
        self.encoder = encoder
        loadables = {"encoder": (encoder, checkpoint)}
        if normalize is not None:
            loadables["normalizer"] = (normalize, normalizer_checkpoint)
        load_speechbrain_checkpoints(source, loadables)
        self.freeze = freeze
        if freeze:
            self.requires_grad_(False)
        self.pass_lengths = pass_lengths
        self.output_size = output_size or getattr(encoder, "output_size", None) or getattr(
            encoder, "d_model", None)
        self.train()

    def _frozen_modules(self):
        if not self.freeze:
            return []
        return [m for m in (self.compute_features, self.normalize, self.encoder) if m is not None]

    def frames(self, n_samples):
        """Number of output frames for ``n_samples`` samples (runs the front end once on
        silence, in eval mode: SpeechBrain encoders do not describe their subsampling)."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                device = next(self.parameters()).device
                frames, _ = self(torch.zeros(1, int(n_samples), device=device))
        finally:
            self.train(was_training)
        return frames.shape[1]

    def forward(self, wavs, wav_lens=None):
        """Encodes ``wavs`` [B, S] with relative ``wav_lens`` [B].

        Returns
        -------
        frames : torch.Tensor
            [B, T, D], zero on padding frames.
        frame_lens : torch.Tensor
            [B] relative lengths: ``wav_lens``, as SpeechBrain's encoders keep them.
        """
        if wav_lens is None:
            wav_lens = torch.ones(wavs.shape[0], device=wavs.device)
        with self._frozen_context():
            x = wavs
            if self.compute_features is not None:
                x = self.compute_features(x)
            if self.normalize is not None:
                x = self.normalize(x, wav_lens)
            x = self.encoder(x, wav_lens) if self.pass_lengths else self.encoder(x)
        if isinstance(x, tuple | list):
            x = x[0]
        return _masked(x, wav_lens), wav_lens


class WaveformEncoder(torch.nn.Module):
    """A front end on raw audio and layers on its frames, called ``encoder(wavs, wav_lens)``.

    ``layers`` is called ``layers(frames, frame_lens)`` and may return a tensor or a tuple
    whose first element is the output (a :class:`~sb_crossmodal_kd.nnet.dmoe.DeepMoE`
    returns ``(output, layer_outputs)``). :class:`~sb_crossmodal_kd.nnet.taps.EncoderTaps`
    taps ``layers``: layer 0 is the front end's output, ``1..L`` the layers' outputs.

    Arguments
    ---------
    front_end : torch.nn.Module
        :class:`Wav2Vec2FrontEnd`, :class:`SpeechBrainFrontEnd` or any module called
        ``front_end(wavs, wav_lens) -> (frames, frame_lens)``.
    layers : torch.nn.Module
        The trainable layers on top (e.g. a DeepMoE whose ``input_size`` is the front end's
        ``output_size``).

    Example
    -------
    >>> from sb_crossmodal_kd.nnet.dmoe import DeepMoE
    >>> from sb_crossmodal_kd.nnet.taps import EncoderTaps
    >>> class Frames(torch.nn.Module):  # stands for a pretrained front end
    ...     output_size = 8
    ...     def forward(self, wavs, wav_lens):
    ...         return wavs.unfold(1, 8, 8), wav_lens
    >>> encoder = WaveformEncoder(Frames(), DeepMoE(8, num_layers=2, layer_size=4, num_experts=2))
    >>> taps = EncoderTaps(encoder, layers=[0, 2])
    >>> output, hidden = taps(torch.randn(3, 80), torch.tensor([1.0, 0.5, 0.8]))
    >>> output.shape, hidden[0].shape, hidden[2].shape
    (torch.Size([3, 10, 4]), torch.Size([3, 10, 8]), torch.Size([3, 10, 4]))
    """

    takes_waveforms = True

    def __init__(self, front_end, layers):
        super().__init__()
        frame_size = getattr(front_end, "output_size", None)
        layer_input = getattr(layers, "input_size", None)
        if frame_size is not None and layer_input is not None and frame_size != layer_input:
            raise ValueError(
                f"WaveformEncoder: the front end gives {frame_size}-dim frames but the "
                f"{type(layers).__name__} on top takes input_size={layer_input}: set its "
                f"input_size to {frame_size}."
            )
        self.front_end = front_end
        self.layers = layers

    def forward(self, wavs, wav_lens=None):
        """[B, S] audio with relative lengths [B] -> [B, T, D], zero on padding frames."""
        if wav_lens is None:
            wav_lens = torch.ones(wavs.shape[0], device=wavs.device)
        frames, frame_lens = self.front_end(wavs, wav_lens)
        output = self.layers(frames, frame_lens)
        if isinstance(output, tuple | list):
            output = output[0]
        return output
