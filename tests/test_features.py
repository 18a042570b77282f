"""Features cached once per utterance are those the model computes from the waveform."""

import torch
from speechbrain.lobes.features import Fbank

from sb_crossmodal_kd.data.features import FeatureCache
from sb_crossmodal_kd.io import write_wav_atomic


def test_cached_features_equal_the_batched_features_of_the_waveforms(tmp_path):
    torch.manual_seed(0)
    fbank = Fbank(n_mels=40)
    waves = [torch.randn(16000) * 0.1, torch.randn(9600) * 0.1]
    for i, wave in enumerate(waves):
        write_wav_atomic(tmp_path / f"{i}.wav", wave.numpy(), 16000)
    cache = FeatureCache(fbank)
    cached = [cache(f"u{i}", str(tmp_path / f"{i}.wav")) for i in range(2)]
    # What the Brain computes without the cache: the padded batch read back from the files.
    import speechbrain as sb

    signals = [sb.dataio.dataio.read_audio(str(tmp_path / f"{i}.wav")) for i in range(2)]
    batch = torch.zeros(2, len(signals[0]))
    batch[0], batch[1, : len(signals[1])] = signals[0], signals[1]
    batched = fbank(batch)
    assert cached[0].shape == batched[0].shape
    assert torch.allclose(cached[0], batched[0], atol=1e-4)
    # The shorter utterance: equal on its own frames (the last one sees the padding).
    n = cached[1].shape[0]
    assert n < batched.shape[1]
    assert torch.allclose(cached[1][: n - 1], batched[1, : n - 1], atol=1e-4)
    assert len(cache) == 2 and cache("u1", "not read again") is cached[1]
