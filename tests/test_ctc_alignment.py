"""CTC forced alignment of a batch: known paths, impossible utterances, torchaudio's paths."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from host_reads import HostReads

from sb_crossmodal_kd.alignment.ctc import ctc_alignable, ctc_frame_positions

BACKENDS = ("viterbi", "torchaudio")


def _peaky(labels, n_classes, sharpness=10.0):
    """Log-posteriors that put almost all mass on ``labels[t]`` at frame ``t``."""
    return torch.log_softmax(sharpness * F.one_hot(torch.tensor(labels), n_classes).float(), -1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_peaky_posterior_gives_the_frames_it_emits_each_token_on(backend):
    # blank = 0; A = 1 peaks on frame 2, B = 2 on frame 5, blank elsewhere
    log_probs = _peaky([0, 0, 1, 0, 0, 2, 0, 0], 3)[None]
    positions = ctc_frame_positions(log_probs, torch.tensor([[1, 2]]), blank_index=0,
                                    backend=backend)
    assert positions.tolist() == [[-1, -1, 0, -1, -1, 1, -1, -1]]
    assert positions.dtype == torch.long


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_token_gets_two_positions_and_blank_may_be_any_index(backend):
    # blank = 3 (after the units, as in the recipes); "A A" peaks on frames 1-2 and 4
    log_probs = _peaky([3, 1, 1, 3, 1, 3], 4)[None]
    positions = ctc_frame_positions(log_probs, torch.tensor([[1, 1]]), blank_index=3,
                                    backend=backend)
    assert positions.tolist() == [[-1, 0, 0, -1, 1, -1]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_impossible_alignment_gives_no_frame_a_position_and_spares_the_others(backend):
    # row 0: "A A A" needs 5 frames (a blank between repeats), has 4; row 1: 4 tokens in
    # 3 frames (relative length 0.75); row 2: alignable
    log_probs = torch.log_softmax(torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0)),
                                  -1)
    tokens = torch.tensor([[1, 1, 1, 0], [1, 2, 3, 4], [2, 3, 0, 0]])
    positions = ctc_frame_positions(log_probs, tokens, frame_lens=torch.tensor([1.0, 0.75, 1.0]),
                                    token_lens=torch.tensor([0.75, 1.0, 0.5]), blank_index=0,
                                    backend=backend)
    assert positions[0].tolist() == [-1] * 4 and positions[1].tolist() == [-1] * 4
    assert sorted(set(positions[2].tolist()) - {-1}) == [0, 1]
    assert ctc_alignable(tokens, torch.tensor([4, 3, 4]), torch.tensor([3, 4, 2]), 0).tolist() \
        == [False, False, True]
    assert ctc_alignable(tokens[:1], torch.tensor([5]), torch.tensor([3]), 0).tolist() == [True]


def _brute_force_best(log_probs, tokens, blank):
    """The best CTC path by enumerating every label sequence of the frames."""
    n_frames, n_classes = log_probs.shape
    best, best_path = float("-inf"), None
    for labels in itertools.product(range(n_classes), repeat=n_frames):
        collapsed = [lab for i, lab in enumerate(labels)
                     if lab != blank and (i == 0 or labels[i - 1] != lab)]
        if collapsed != tokens:
            continue
        score = sum(float(log_probs[t, lab]) for t, lab in enumerate(labels))
        if score > best:
            best, best_path = score, labels
    positions, k = [], -1
    for i, lab in enumerate(best_path):
        if lab != blank and (i == 0 or best_path[i - 1] != lab):
            k += 1
        positions.append(k if lab != blank else -1)
    return positions


def test_viterbi_is_the_best_path_by_enumeration():
    gen = torch.Generator().manual_seed(3)
    for tokens in ([1, 2], [1, 1], [2, 1, 2], [2]):
        log_probs = torch.log_softmax(2.0 * torch.randn(6, 3, generator=gen), -1)
        got = ctc_frame_positions(log_probs[None], torch.tensor([tokens]), blank_index=0,
                                  backend="viterbi")
        assert got[0].tolist() == _brute_force_best(log_probs, tokens, 0), tokens


def test_batched_viterbi_equals_torchaudio_forced_align_per_utterance():
    gen = torch.Generator().manual_seed(1)
    for _ in range(60):
        batch = int(torch.randint(1, 5, (1,), generator=gen))
        n_time = int(torch.randint(1, 25, (1,), generator=gen))
        n_classes = int(torch.randint(2, 6, (1,), generator=gen))
        n_tok = int(torch.randint(0, 9, (1,), generator=gen))
        blank = int(torch.randint(0, n_classes, (1,), generator=gen))
        log_probs = torch.log_softmax(3.0 * torch.randn(batch, n_time, n_classes, generator=gen),
                                      -1)
        tokens = torch.randint(0, n_classes - 1, (batch, n_tok), generator=gen)
        tokens = tokens + (tokens >= blank).long()  # never the blank
        frame_lens = torch.randint(1, n_time + 1, (batch,), generator=gen) / n_time
        token_lens = torch.randint(0, n_tok + 1, (batch,), generator=gen) / max(n_tok, 1)
        frame_lens[0], token_lens[0] = 1.0, 1.0 if n_tok else 0.0
        ours = ctc_frame_positions(log_probs, tokens, frame_lens, token_lens, blank,
                                   backend="viterbi")
        reference = ctc_frame_positions(log_probs, tokens, frame_lens, token_lens, blank,
                                        backend="torchaudio")
        assert torch.equal(ours, reference)
        # frames past each utterance's length (rounded as the CTC loss rounds) get none
        n_frames = torch.round(frame_lens * n_time).long()
        for b in range(batch):
            assert ours[b, n_frames[b]:].eq(-1).all()


def test_half_precision_posteriors_and_logits_give_the_same_path():
    gen = torch.Generator().manual_seed(2)
    logits = torch.round(24.0 * torch.randn(2, 12, 6, generator=gen)) / 8  # exact in fp16
    tokens = torch.tensor([[1, 2, 2, 3], [4, 1, 0, 0]])
    lens = torch.tensor([1.0, 0.5])
    reference = ctc_frame_positions(torch.log_softmax(logits, -1), tokens, None, lens, 5)
    assert torch.equal(ctc_frame_positions(logits, tokens, None, lens, 5), reference)
    assert torch.equal(ctc_frame_positions(logits.double(), tokens, None, lens, 5), reference)
    assert torch.equal(ctc_frame_positions(logits.half(), tokens, None, lens, 5), reference)
    assert torch.equal(ctc_frame_positions(logits.half(), tokens, None, lens, 5,
                                           backend="viterbi"), reference)


def test_viterbi_reads_nothing_back_to_the_host():
    log_probs = torch.log_softmax(torch.randn(3, 10, 5), -1)
    tokens = torch.tensor([[1, 1, 2], [3, 4, 0], [1, 1, 1]])
    with HostReads() as recorder:
        ctc_frame_positions(log_probs, tokens, torch.tensor([1.0, 0.8, 0.3]),
                            torch.tensor([1.0, 2 / 3, 1.0]), blank_index=0, backend="viterbi")
    assert recorder.reads == []


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="backend"):
        ctc_frame_positions(torch.zeros(1, 2, 3), torch.tensor([[1]]), backend="k2")
    with pytest.raises(ValueError, match="same B"):
        ctc_frame_positions(torch.zeros(2, 2, 3), torch.tensor([[1]]))
