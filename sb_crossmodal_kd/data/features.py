"""Acoustic features computed once per utterance, for training on small corpora.

Training for tens of epochs on a corpus of a few hours computes the same filterbanks every
epoch; :class:`FeatureCache` computes them on an utterance's first use, with the recipe's own
``compute_features`` module (so the cached features are exactly those the model would
compute from the waveform), and keeps them in memory. The recipes turn it on with
``cache_features: True``; left off (SpeechBrain's default), features are computed from the
waveform in every batch, which a corpus too large for memory, or waveform augmentation
such as speed perturbation, needs.
"""

import speechbrain as sb
import torch

from sb_crossmodal_kd.data.audio import load_audio

__all__ = ["FeatureCache"]


class FeatureCache:
    """A SpeechBrain dynamic item giving each utterance's features ``[T, F]``, computed once.

    Arguments
    ---------
    compute_features : callable
        Waveforms ``[B, S]`` -> features ``[B, T, F]`` (e.g. SpeechBrain's ``Fbank``).
    sample_rate : int
        The rate ``compute_features`` expects; audio at another rate is resampled on load.

    Example
    -------
    >>> import tempfile, pathlib
    >>> from speechbrain.lobes.features import Fbank
    >>> from sb_crossmodal_kd.io import write_wav_atomic
    >>> wav = pathlib.Path(tempfile.mkdtemp()) / "a.wav"
    >>> write_wav_atomic(wav, torch.randn(8000).numpy() * 0.1, 16000)
    >>> cache = FeatureCache(Fbank(n_mels=20), sample_rate=16000)
    >>> feats = cache("utt1", str(wav))
    >>> feats.shape, len(cache), cache("utt1", str(wav)) is feats
    (torch.Size([51, 20]), 1, True)
    """

    def __init__(self, compute_features, sample_rate):
        self.compute_features = compute_features
        self.sample_rate = sample_rate
        self._features = {}

    def __len__(self):
        return len(self._features)

    def __call__(self, utt_id, wav):
        feats = self._features.get(utt_id)
        if feats is None:
            signal = load_audio(wav, self.sample_rate)
            with torch.no_grad():
                feats = self.compute_features(signal[None]).squeeze(0)
            self._features[utt_id] = feats
        return feats

    def dynamic_item(self):
        """The item to add to a ``DynamicItemDataset``: takes ``id``, ``wav``; provides
        ``feats``."""
        return sb.utils.data_pipeline.DynamicItem(takes=["id", "wav"], func=self,
                                                  provides=["feats"])
