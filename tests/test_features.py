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
    cache = FeatureCache(fbank, sample_rate=16000)
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


def test_telephone_audio_is_cached_at_the_models_rate(tmp_path):
    # 8 kHz audio gives the frames of its duration at 16 kHz, and features close to those
    # of the same speech recorded at 16 kHz (below 4 kHz, all a telephone keeps).
    import torchaudio

    torch.manual_seed(0)
    wide = torchaudio.functional.lowpass_biquad(torch.randn(16000) * 0.1, 16000, 3000)
    write_wav_atomic(tmp_path / "wide.wav", wide.numpy(), 16000)
    narrow = torchaudio.functional.resample(wide, 16000, 8000)
    write_wav_atomic(tmp_path / "narrow.wav", narrow.numpy(), 8000)
    cache = FeatureCache(Fbank(n_mels=40), sample_rate=16000)
    from_wide, from_narrow = cache("wide", tmp_path / "wide.wav"), cache("narrow",
                                                                       tmp_path / "narrow.wav")
    assert from_narrow.shape == from_wide.shape == (101, 40)
    low_bands = slice(0, 25)  # mel bands below about 3 kHz
    assert torch.allclose(from_narrow[5:-5, low_bands], from_wide[5:-5, low_bands], atol=0.2)
