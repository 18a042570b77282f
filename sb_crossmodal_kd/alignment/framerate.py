"""Frame-rate arithmetic shared by every aligner, importer and data pipeline.

The acoustic model sees 10 ms feature frames from ``speechbrain.lobes.features.Fbank``
(``center=True``: feature frame ``i`` is centred on sample ``i * hop``, so an utterance of
``n`` samples has ``1 + n // hop`` frames) and subsamples them with a
``ConvolutionFrontEnd`` whose strided blocks pad ``kernel_size // 2`` on each side. Each
strided block therefore maps ``L`` frames to ``floor((L + 2 * (k // 2) - d * (k - 1) - 1) / s)
+ 1`` frames (``ceil(L / 2)`` for the default kernel 3, stride 2), and encoder frame ``j`` is
centred on feature frame ``j * subsampling``, i.e. at time ``j * subsampling * hop_s``.

All alignments in this package are stored at the *encoder* rate: one label per encoder frame.
Conversions go through :class:`FrameRate`, so that a change of front end is one setting.

Example
-------
>>> rate = FrameRate()  # 16 kHz, 10 ms hop, two stride-2 blocks: 40 ms encoder frames
>>> rate.feature_frames(16000), rate.encoder_frames(101), rate.frames_for_samples(16000)
(101, 26, 26)
>>> rate.encoder_shift_s
0.04
>>> rate.segments_to_frames([(0, 0.0, 0.05), (1, 0.05, 0.2)], n_frames=5, shift_s=0.04)
array([0, 0, 1, 1, 1], dtype=int32)
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

# Encoder frames an alignment may differ from its audio by (front-end rounding); more means
# it belongs to other audio or another frame rate. The units pipeline and the KD Brain both
# fit alignments to the encoder's frames within it.
ENCODER_FRAME_TOLERANCE = 2


class AlignmentLengthError(ValueError):
    """An alignment is longer or shorter than its audio by more than the tolerance."""


@dataclass(frozen=True)
class FrameRate:
    """The frame geometry of an Fbank + strided convolution front end.

    Arguments
    ---------
    sample_rate : int
        Audio sample rate in Hz.
    hop_length_ms : float
        Feature hop in milliseconds (``Fbank(hop_length=...)``).
    strides : tuple of int
        Stride of each strided front-end block, in order (``ConvolutionFrontEnd(strides=...)``;
        blocks of stride 1 with ``same`` padding keep the length and may be left out).
    kernel_sizes : tuple of int
        Kernel size of each listed block.
    dilations : tuple of int
        Dilation of each listed block.
    """

    sample_rate: int = 16000
    hop_length_ms: float = 10.0
    strides: tuple = (2, 2)
    kernel_sizes: tuple = (3, 3)
    dilations: tuple = (1, 1)

    def __post_init__(self):
        if not len(self.strides) == len(self.kernel_sizes) == len(self.dilations):
            raise ValueError(
                f"FrameRate: strides {self.strides}, kernel_sizes {self.kernel_sizes} and "
                f"dilations {self.dilations} must list the same blocks"
            )

    @property
    def hop_samples(self):
        """Feature hop in samples."""
        return int(round(self.sample_rate * self.hop_length_ms / 1000))

    @property
    def feature_shift_s(self):
        """Seconds between feature frames."""
        return self.hop_samples / self.sample_rate

    @property
    def subsampling(self):
        """Feature frames per encoder frame."""
        return math.prod(self.strides)

    @property
    def encoder_shift_s(self):
        """Seconds between encoder frames."""
        return round(self.feature_shift_s * self.subsampling, 9)

    def feature_frames(self, n_samples):
        """Number of Fbank frames for ``n_samples`` samples (int or integer tensor/array)."""
        return 1 + n_samples // self.hop_samples

    def encoder_frames(self, n_feature_frames):
        """Number of encoder frames the front end outputs for ``n_feature_frames`` frames."""
        length = n_feature_frames
        for stride, kernel, dilation in zip(self.strides, self.kernel_sizes, self.dilations, strict=True):
            pad = 2 * (kernel // 2) if stride > 1 else dilation * (kernel - 1)
            length = (length + pad - dilation * (kernel - 1) - 1) // stride + 1
        return length

    def frames_for_samples(self, n_samples):
        """Number of encoder frames for ``n_samples`` samples of audio."""
        return self.encoder_frames(self.feature_frames(n_samples))

    def frames_for_duration(self, duration_s):
        """Number of encoder frames for ``duration_s`` seconds of audio."""
        return self.frames_for_samples(int(round(duration_s * self.sample_rate)))

    def segments_to_frames(self, segments, n_frames, shift_s=None, fill=-1):
        """Labels frames from time segments: each frame takes the segment holding its centre.

        Arguments
        ---------
        segments : iterable of (label, start_s, end_s)
            Non-overlapping segments with integer labels.
        n_frames : int
            Number of frames to label.
        shift_s : float, optional
            Frame shift in seconds (default: the encoder shift). Frame ``j`` is centred at
            ``j * shift_s``, as the front end's frames are.
        fill : int
            Label of frames no segment covers.

        Returns
        -------
        numpy.ndarray
            ``int32`` labels, shape ``(n_frames,)``.
        """
        shift_s = self.encoder_shift_s if shift_s is None else shift_s
        labels = np.full(n_frames, fill, dtype=np.int32)
        for label, start, end in segments:
            # Frames whose centre j * shift lies in [start, end).
            first = max(0, math.ceil(start / shift_s - 1e-9))
            last = min(n_frames, math.ceil(end / shift_s - 1e-9))
            if last > first:
                labels[first:last] = label
        return labels

    def downsample(self, feature_labels, mode="majority", n_frames=None):
        """Feature-rate labels (one per 10 ms frame) to encoder-rate labels.

        Arguments
        ---------
        feature_labels : array-like of int, shape ``(T_feat,)``
            One label per feature frame (``-1`` allowed for "no unit").
        mode : str
            ``"centre"``: encoder frame ``j`` takes the label of feature frame
            ``j * subsampling`` (its receptive-field centre). ``"majority"``: the most common
            label among the ``subsampling`` feature frames around that centre
            (``[j*s - s//2, j*s + s - s//2)``), ties to the centre frame's label.
        n_frames : int, optional
            Number of encoder frames (default: :meth:`encoder_frames` of ``T_feat``).

        Returns
        -------
        numpy.ndarray
            ``int32`` labels, shape ``(n_frames,)``.
        """
        labels = np.asarray(feature_labels, dtype=np.int64)
        if n_frames is None:
            n_frames = self.encoder_frames(len(labels))
        s = self.subsampling
        centres = np.minimum(np.arange(n_frames) * s, len(labels) - 1)
        centre_labels = labels[centres]
        if mode == "centre":
            return centre_labels.astype(np.int32)
        if mode != "majority":
            raise ValueError(f"downsample mode must be 'majority' or 'centre', got {mode!r}")
        offsets = np.arange(s) - s // 2
        window = np.clip(centres[:, None] + offsets[None, :], 0, len(labels) - 1)
        votes = labels[window]  # (n_frames, s)
        counts = (votes[:, :, None] == votes[:, None, :]).sum(-1)  # count of each vote
        best = counts.max(1, keepdims=True)
        # The centre label wins ties; otherwise the first label with the top count.
        centre_count = (votes == centre_labels[:, None]).sum(1)
        first_best = votes[np.arange(n_frames), (counts == best).argmax(1)]
        out = np.where(centre_count == best[:, 0], centre_labels, first_best)
        return out.astype(np.int32)


def fit_to_length(labels, n_frames, tolerance, utterance_id, fill=None):
    """Pads or trims an alignment to ``n_frames``, refusing a mismatch beyond ``tolerance``.

    The one frame fit of the package: the units pipeline fits each utterance's stored
    alignment to its audio's encoder frames, and the KD Brain fits a batch to the frames its
    encoder really gives (a recipe's own front end may round the ends differently).

    Arguments
    ---------
    labels : numpy.ndarray or torch.Tensor
        Per-frame labels (or positions), shape ``(T,)``, or ``(B, T)`` for a batch; fitted
        along the last axis (a tensor stays a tensor, on its device).
    n_frames : int
        Number of frames the audio really has at this rate.
    tolerance : int
        Largest accepted ``abs(T - n_frames)``; a small mismatch is common (different
        framing conventions at the ends), a large one means the wrong audio or wrong rate.
    utterance_id : str or list of str
        Named in the error (a batch's IDs: the first few are named).
    fill : int, optional
        Value for padded frames (default: repeat the last label; ``-1`` if there is none).

    Returns
    -------
    numpy.ndarray or torch.Tensor
        Shape ``(..., n_frames)``.

    Example
    -------
    >>> fit_to_length(np.array([1, 2, 3]), 4, tolerance=1, utterance_id="u1")
    array([1, 2, 3, 3])
    >>> fit_to_length(np.array([1, 2, 3]), 9, tolerance=1, utterance_id="u1")
    Traceback (most recent call last):
    ...
    sb_crossmodal_kd.alignment.framerate.AlignmentLengthError: utterance 'u1': ...
    """
    is_tensor = isinstance(labels, torch.Tensor)  # stays on its device: no copy to the host
    if not is_tensor:
        labels = np.asarray(labels)
    length = labels.shape[-1]
    diff = length - n_frames
    if abs(diff) > tolerance:
        if isinstance(utterance_id, str):
            who = f"utterance {utterance_id!r}"
        else:
            who = f"batch {list(utterance_id)[:4]}..."
        raise AlignmentLengthError(
            f"{who}: alignment has {length} frames but its audio has {n_frames} "
            f"({'longer' if diff > 0 else 'shorter'} by {abs(diff)}, tolerance "
            f"{tolerance}); check that the alignment belongs to this audio, is at the encoder "
            "frame rate (after the front end's subsampling) and that the audio is read at the "
            "rate it was made at (sb_crossmodal_kd.data.audio.load_audio resamples)"
        )
    if diff >= 0:
        return labels[..., :n_frames]
    shape = (*labels.shape[:-1], -diff)
    if fill is None and length:
        edge = labels[..., -1:]
        pad = edge.expand(shape) if is_tensor else np.broadcast_to(edge, shape)
    else:
        value = -1 if fill is None else fill
        pad = labels.new_full(shape, value) if is_tensor else np.full(shape, value, labels.dtype)
    if is_tensor:
        return torch.cat([labels, pad], dim=-1)
    return np.concatenate([labels, pad], axis=-1)
