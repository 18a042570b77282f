"""Viterbi forced alignment recovers planted alignments exactly."""

import pytest
import torch

from sb_crossmodal_kd.alignment.viterbi import AlignmentError, segments, viterbi_align


def _planted(seed, n_tokens=25, n_classes=40, max_dur=9, min_dur=1, drop_optional=0.5):
    """A token sequence with optional silences, a planted segmentation and noisy posteriors."""
    gen = torch.Generator().manual_seed(seed)
    tokens, optional = [], []
    for k in range(n_tokens):
        if k % 4 == 3:
            tokens.append(0)  # silence between "words"
            optional.append(True)
        else:
            token = int(torch.randint(1, n_classes, (1,), generator=gen))
            while tokens and token == tokens[-1]:  # equal neighbours have no observable boundary
                token = int(torch.randint(1, n_classes, (1,), generator=gen))
            tokens.append(token)
            optional.append(False)
    positions = []
    for k, opt in enumerate(optional):
        if opt and float(torch.rand(1, generator=gen)) < drop_optional:
            continue  # this silence is absent from the audio
        dur = int(torch.randint(min_dur, max_dur + 1, (1,), generator=gen))
        positions += [k] * dur
    positions = torch.tensor(positions)
    true_class = torch.tensor(tokens)[positions]
    # Noisy logits where the true class wins each frame by a margin, other classes random.
    logits = torch.randn(len(positions), n_classes, generator=gen)
    logits[torch.arange(len(positions)), true_class] = logits.max(1).values + 1.0
    return torch.log_softmax(logits, -1), tokens, optional, positions


@pytest.mark.parametrize("seed", range(5))
def test_recovers_planted_alignment_exactly(seed):
    log_probs, tokens, optional, positions = _planted(seed, min_dur=2)
    path = viterbi_align(log_probs, tokens, min_duration=2, optional=optional)
    assert path.shape == positions.shape
    assert torch.equal(path, positions)


def test_minimum_duration_overrides_weak_evidence():
    # Token 1 is favoured on only one frame; with min_duration 3 it must take 3 frames.
    frames = torch.tensor([1, 1, 1, 1, 2, 3, 3, 3, 3])
    log_probs = torch.log_softmax(4.0 * torch.nn.functional.one_hot(frames, 4).float(), -1)
    free = viterbi_align(log_probs, [1, 2, 3], min_duration=1)
    assert free.tolist() == [0, 0, 0, 0, 1, 2, 2, 2, 2]
    constrained = viterbi_align(log_probs, [1, 2, 3], min_duration=3)
    assert (constrained == 1).sum() == 3
    assert [s[0] for s in segments(constrained)] == [0, 1, 2]
    per_token = viterbi_align(log_probs, [1, 2, 3], min_duration=[4, 2, 3])
    assert per_token.tolist() == [0, 0, 0, 0, 1, 1, 2, 2, 2]


def test_optional_edges_and_every_frame_labelled():
    frames = torch.tensor([2, 2, 3, 3, 3])
    log_probs = torch.log_softmax(4.0 * torch.nn.functional.one_hot(frames, 4).float(), -1)
    # Leading and trailing silences (class 0) are optional and absent in the frames.
    path = viterbi_align(log_probs, [0, 2, 3, 0], optional=[True, False, False, True])
    assert path.tolist() == [1, 1, 2, 2, 2]


def test_too_few_frames_names_the_utterance():
    log_probs = torch.zeros(4, 5).log_softmax(-1)
    with pytest.raises(AlignmentError, match="'utt9'.*at least 6 frames"):
        viterbi_align(log_probs, [1, 2, 3], min_duration=2, utterance_id="utt9")


@pytest.mark.parametrize("seed", range(3))
def test_recovers_planted_substate_alignment_exactly(seed):
    """Phones of 3 HMM states each (classes 3p, 3p+1, 3p+2), optional silences between."""
    gen = torch.Generator().manual_seed(seed)
    phones = [0, 5, 9, 0, 7, 5, 0, 2, 0]  # 0: silence, optional
    optional = [p == 0 for p in phones]
    tokens = [[3 * p, 3 * p + 1, 3 * p + 2] for p in phones]
    positions, substates = [], []
    for k, opt in enumerate(optional):
        if opt and k % 2 == 1:
            continue  # one of the inner silences is absent
        for j in range(3):
            n = int(torch.randint(1, 5, (1,), generator=gen))
            positions += [k] * n
            substates += [j] * n
    true_class = torch.tensor([tokens[k][j] for k, j in zip(positions, substates, strict=True)])
    logits = torch.randn(len(positions), 30, generator=gen)
    logits[torch.arange(len(positions)), true_class] = logits.max(1).values + 1.0
    pos, sub = viterbi_align(logits.log_softmax(-1), tokens, optional=optional,
                             return_substates=True)
    assert pos.tolist() == positions and sub.tolist() == substates
