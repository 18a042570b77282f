"""The aligner learns a phone model from scratch and recovers planted word boundaries."""

import numpy as np
import pytest
import torch

from sb_crossmodal_kd.alignment.corpus import align_manifest
from sb_crossmodal_kd.alignment.forced import AlignerSettings, PhoneAligner, boundary_errors
from sb_crossmodal_kd.units.lexicon import Lexicon
from sb_crossmodal_kd.units.phones import PHONES

# Four "phones", each a tone of its own frequency; silence is faint noise.
TONES = {"AA": 300.0, "IY": 900.0, "S": 2500.0, "M": 1500.0}
LEXICON = {"sam": [["S", "AA", "M"]], "me": [["M", "IY"]], "miss": [["M", "IY", "S"]],
           "ma": [["M", "AA"]], "sea": [["S", "IY"]]}


def _utterance(rng, words, sample_rate=16000):
    """A waveform with planted word times: tones per phone, silences of random length."""
    pieces, times, t = [], [], 0.0

    def add(seconds, freq=None):
        n = int(seconds * sample_rate)
        if freq is None:
            pieces.append(0.01 * rng.standard_normal(n))
        else:
            phase = rng.uniform(0, 2 * np.pi)
            pieces.append(0.5 * np.sin(2 * np.pi * freq * np.arange(n) / sample_rate + phase))
        return n / sample_rate

    t += add(rng.uniform(0.1, 0.3))
    for w in words:
        start = t
        for phone in LEXICON[w][0]:
            t += add(rng.uniform(0.05, 0.15), TONES[phone])
        times.append((w, start, t))
        if rng.uniform() < 0.5:
            t += add(rng.uniform(0.05, 0.2))
    t += add(rng.uniform(0.1, 0.3))
    wav = np.concatenate(pieces) + 0.003 * rng.standard_normal(sum(len(p) for p in pieces))
    return torch.tensor(wav, dtype=torch.float32), times


# The phone model trains and runs on any device; a GPU run adds the CUDA case.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_flat_start_aligner_learns_and_recovers_planted_word_boundaries(device, tmp_path):
    rng = np.random.default_rng(0)
    vocab = list(LEXICON)
    data = []
    for i in range(40):
        words = [vocab[j] for j in rng.integers(0, len(vocab), rng.integers(2, 5))]
        wav, times = _utterance(rng, words)
        data.append((f"u{i}", wav, " ".join(words), times))
    lexicon = Lexicon(LEXICON)
    settings = AlignerSettings(hidden=32, layers=2, iterations=3, epochs=4, chunk_frames=100,
                               batch_size=8, init="flat")
    aligner = PhoneAligner(lexicon, settings, device)
    aligner.train([(u, wav, text) for u, wav, text, _ in data[:30]], progress=False)
    errors = []
    for u, wav, text, times in data[30:]:  # held-out utterances
        result = aligner.align(wav, text, u)
        assert len(result.feature_positions) == aligner.settings.frame_rate.feature_frames(len(wav))
        errors += boundary_errors(times, result.words)
    errors = np.asarray(errors)
    # Tone onsets are abrupt and the 25 ms analysis window sees them early, so boundaries sit
    # a little outside the planted ones; nearly all are within 40 ms.
    assert (errors <= 0.04).mean() >= 0.85 and errors.mean() < 0.035, errors
    # An untrained aligner (same settings) is far worse: the test measures learning.
    untrained = PhoneAligner(lexicon, settings, device)
    base = []
    for u, wav, text, times in data[30:]:
        base += boundary_errors(times, untrained.align(wav, text, u).words)
    assert np.mean(base) > 2 * errors.mean()
    # Saved from any device, it loads on the CPU and aligns as it did where it trained.
    aligner.save(tmp_path / "aligner.pt")
    loaded = PhoneAligner.load(tmp_path / "aligner.pt", lexicon, "cpu")
    for u, wav, text, _ in data[30:]:
        there = aligner.align(wav, text, u).feature_positions
        here = loaded.align(wav, text, u).feature_positions
        assert np.mean(np.asarray(there) == np.asarray(here)) >= 0.98, u


def test_align_manifest_skips_oov_utterances_with_reason(tmp_path):
    import soundfile

    rng = np.random.default_rng(1)
    wav, _ = _utterance(rng, ["sam", "me"])
    soundfile.write(tmp_path / "a.wav", wav.numpy(), 16000)
    rows = [{"ID": "a", "wav": str(tmp_path / "a.wav"), "wrd": "sam me"},
            {"ID": "b", "wav": str(tmp_path / "a.wav"), "wrd": "sam zorp"}]
    aligner = PhoneAligner(Lexicon(LEXICON), AlignerSettings(hidden=16, layers=1))
    alignments, report = align_manifest(aligner, rows, progress=False)
    assert list(alignments) == ["a"]
    assert report["skipped"][0][0] == "b" and "zorp" in report["skipped"][0][1]
    assert report["audio_s_per_s"] > 0


def _planted_scores(aligner, frame_classes):
    """Log-likelihoods where each frame's planted class clearly wins."""
    classes = torch.tensor(frame_classes)
    logits = 5.0 * torch.nn.functional.one_hot(classes, aligner.n_classes).float()
    return logits.log_softmax(-1)


@pytest.mark.parametrize("pause_states", [1, 3])
def test_one_frame_pause_between_words_is_aligned_with_the_short_pause(pause_states):
    lexicon = Lexicon({"sam": [["S", "AA", "M"]], "me": [["M", "IY"]]})
    aligner = PhoneAligner(lexicon, AlignerSettings(pause_states=pause_states))
    state = {p: [3 * PHONES.index(p) + j for j in range(3)] for p in ("sil", "S", "AA", "M", "IY")}
    frames = (state["sil"] * 2 + state["S"] + state["AA"] + state["M"]  # frames 0-14
              + [state["sil"][1]]  # a 10 ms pause: frame 15
              + state["M"] + state["IY"] + state["sil"] * 2)  # frames 16-27
    scores = _planted_scores(aligner, frames)
    aligner.log_likelihoods = lambda feats: scores
    words = aligner.align_features(torch.zeros(len(frames), 40), "sam me", "u1").words
    # Frame j spans [(j - 0.5) * 10 ms, (j + 0.5) * 10 ms).
    planted = [("sam", 0.055, 0.145), ("me", 0.155, 0.215)]
    if pause_states == 1:
        assert words == planted
    else:  # a three-state silence needs 30 ms: the pause is given to a word
        assert words != planted and words[0][2] == words[1][1]
