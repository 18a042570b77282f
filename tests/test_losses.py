"""Distillation losses against plain, independent computations on tiny tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from sb_crossmodal_kd.losses import (
    DistillationObjective,
    UnitTargets,
    auxiliary_losses,
    combine_losses,
    distillation_loss,
    frame_ce_loss,
    gather_teacher_to_frames,
    label_interpolation_loss,
    topk_kl_divergence,
)
from sb_crossmodal_kd.nnet.heads import AuxiliaryHead, AuxiliaryHeads

V = 6


def _softmax(row, tau=1.0):
    exps = [math.exp(v / tau) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def _make_batch(seed=0, k=2, vocab=V):
    """Two utterances, 5 frames, up to 3 unit positions; -1 frames and padding included."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 5, vocab, generator=gen, dtype=torch.float64)
    units = torch.tensor([[1, 4, 2], [3, 0, 0]])
    f2p = torch.tensor([[-1, 0, 1, 1, 2], [0, 0, -1, 0, -1]])
    raw = torch.rand(2, 3, vocab, generator=gen, dtype=torch.float64) + 0.05
    full = raw / raw.sum(-1, keepdim=True)
    top_probs, top_ids = full.topk(k, dim=-1)
    residual = 1.0 - top_probs.sum(-1)
    return logits, units, f2p, (top_probs, top_ids, residual), full


def _frames(f2p):
    return [(b, t, int(f2p[b, t])) for b in range(f2p.shape[0]) for t in range(f2p.shape[1])
            if int(f2p[b, t]) >= 0]


def _brute_kl(logits, teacher, f2p, tau=1.0):
    """Coarsened KL by explicit loops: events = the teacher's top-k ids + one 'rest' event."""
    top_probs, top_ids, residual = teacher
    total, count = 0.0, 0
    for b, t, k in _frames(f2p):
        p = _softmax(logits[b, t].tolist(), tau)
        ids = top_ids[b, k].tolist()
        kl = 0.0
        for q, i in zip(top_probs[b, k].tolist(), ids, strict=True):
            if q > 0:
                kl += q * (math.log(q) - math.log(p[i]))
        r = float(residual[b, k])
        if r > 0:
            p_rest = sum(p[j] for j in range(len(p)) if j not in ids)
            kl += r * (math.log(r) - math.log(p_rest))
        total += kl
        count += 1
    return total / count


def test_frame_ce_matches_hand_computation():
    logits, units, f2p, _, _ = _make_batch()
    expected, count = 0.0, 0
    for b, t, k in _frames(f2p):
        p = _softmax(logits[b, t].tolist())
        expected -= math.log(p[int(units[b, k])])
        count += 1
    got = frame_ce_loss(logits, units, f2p)
    assert got.item() == pytest.approx(expected / count, rel=1e-6)


def test_frame_ce_on_known_numbers():
    # uniform logits over 4 classes: CE = log 4 per frame, whatever the label
    logits = torch.zeros(1, 3, 4)
    loss = frame_ce_loss(logits, torch.tensor([[2, 3]]), torch.tensor([[0, -1, 1]]))
    assert loss.item() == pytest.approx(math.log(4), rel=1e-6)


def test_label_interpolation_lambda_zero_is_plain_ce_exactly():
    logits, units, f2p, teacher, _ = _make_batch()
    for dtype in (torch.float32, torch.float64):
        li = label_interpolation_loss(logits.to(dtype), units, f2p, teacher, lam=0.0)
        assert torch.equal(li, frame_ce_loss(logits.to(dtype), units, f2p))


@pytest.mark.parametrize("blank_index", [None, 5])
def test_label_interpolation_matches_brute_force(blank_index):
    logits, units, f2p, teacher, _ = _make_batch(seed=3, k=2)
    lam = 0.3
    top_probs, top_ids, residual = teacher
    expected, count = 0.0, 0
    for b, t, k in _frames(f2p):
        p = _softmax(logits[b, t].tolist())
        ids = top_ids[b, k].tolist()
        # the target as an explicit distribution over the k + 1 events plus the hard label
        ce = -(1 - lam) * math.log(p[int(units[b, k])])
        for q, i in zip(top_probs[b, k].tolist(), ids, strict=True):
            ce -= lam * q * math.log(p[i])
        rest = [j for j in range(V) if j not in ids and j != blank_index]
        ce -= lam * float(residual[b, k]) * math.log(sum(p[j] for j in rest))
        expected += ce
        count += 1
    got = label_interpolation_loss(logits, units, f2p, teacher, lam, blank_index=blank_index)
    assert got.item() == pytest.approx(expected / count, rel=1e-9)


def test_label_interpolation_lambda_one_is_teacher_cross_entropy():
    # with k = V the target is the teacher alone: CE = KL + H(q)
    logits, units, f2p, _, full = _make_batch(seed=4)
    probs, ids = full.sort(dim=-1, descending=True)
    teacher = (probs, ids, torch.zeros(2, 3, dtype=torch.float64))
    li = label_interpolation_loss(logits, units, f2p, teacher, lam=1.0)
    expected, count = 0.0, 0
    for b, t, k in _frames(f2p):
        p = _softmax(logits[b, t].tolist())
        expected -= sum(full[b, k, i].item() * math.log(p[i]) for i in range(V))
        count += 1
    assert li.item() == pytest.approx(expected / count, rel=1e-9)


def test_kd_with_full_vocabulary_equals_torch_kl():
    logits, _, f2p, _, full = _make_batch(seed=1)
    probs, ids = full.sort(dim=-1, descending=True)  # k = V, residual 0
    teacher = (probs, ids, torch.zeros(2, 3, dtype=torch.float64))
    got = distillation_loss(logits, teacher, f2p)
    mask = f2p >= 0
    frame_teacher = full[torch.arange(2)[:, None], f2p.clamp(min=0)]  # [B, T, V]
    per_frame = torch.nn.functional.kl_div(
        torch.log_softmax(logits, -1), frame_teacher, reduction="none"
    ).sum(-1)
    expected = per_frame[mask].sum() / mask.sum()
    assert got.item() == pytest.approx(expected.item(), rel=1e-9)


@pytest.mark.parametrize("k,tau", [(1, 1.0), (2, 1.0), (3, 2.5)])
def test_kd_lumped_residual_matches_brute_force(k, tau):
    logits, _, f2p, teacher, _ = _make_batch(seed=2, k=k)
    got = distillation_loss(logits, teacher, f2p, tau=tau)
    assert got.item() == pytest.approx(_brute_kl(logits, teacher, f2p, tau), rel=1e-9)


def test_kd_tau_squared_scaling_is_a_setting():
    logits, _, f2p, teacher, _ = _make_batch(seed=2)
    plain = distillation_loss(logits, teacher, f2p, tau=2.0)
    scaled = distillation_loss(logits, teacher, f2p, tau=2.0, scale_by_tau_squared=True)
    assert scaled.item() == pytest.approx(4.0 * plain.item(), rel=1e-12)


def test_kd_zero_when_student_equals_coarsened_teacher():
    # student: teacher's top-k probabilities, residual spread over the other ids
    probs = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04], dtype=torch.float64)
    kl = topk_kl_divergence(probs.log(), torch.tensor([0.5, 0.3]), torch.tensor([0, 1]),
                            torch.tensor(0.2))
    assert abs(kl.item()) < 1e-7


def test_kd_rest_mass_tiny_stays_exact():
    # P_rest ~ 1e-20: log(1 - sum p) is useless in float32, logsumexp is not
    logits = torch.tensor([[[30.0, 29.0, -20.0, -21.0]]])
    teacher = (torch.tensor([[[0.6, 0.3]]]), torch.tensor([[[0, 1]]]), torch.tensor([[0.1]]))
    got = distillation_loss(logits, teacher, torch.tensor([[0]]))
    assert torch.isfinite(got)
    expected = _brute_kl(logits.double(), tuple(x.double() if x.is_floating_point() else x
                                                for x in teacher), torch.tensor([[0]]))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_kd_residual_rounding_with_full_vocabulary_is_finite_and_differentiable():
    logits = torch.randn(1, 2, 3, requires_grad=True)
    teacher = (torch.tensor([[[0.5, 0.3, 0.2]]]), torch.tensor([[[2, 0, 1]]]),
               torch.tensor([[1e-7]]))
    loss = distillation_loss(logits, teacher, torch.tensor([[0, 0]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_zero_probability_teacher_entries_are_harmless():
    logits = torch.randn(1, 1, 4, requires_grad=True)
    teacher = (torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[3, 1]]]), torch.tensor([[0.0]]))
    loss = distillation_loss(logits, teacher, torch.tensor([[0]]))
    loss.backward()
    expected = -torch.log_softmax(logits.detach(), -1)[0, 0, 3]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.isfinite(logits.grad).all()


def _loss_fns(units, teacher):
    return {
        "frame_ce": lambda lg, f2p, lens: frame_ce_loss(lg, units, f2p, lens),
        "li": lambda lg, f2p, lens: label_interpolation_loss(lg, units, f2p, teacher, 0.4,
                                                             lens),
        "kd": lambda lg, f2p, lens: distillation_loss(lg, teacher, f2p, 1.5, lens),
    }


@pytest.mark.parametrize("name", ["frame_ce", "li", "kd"])
def test_masked_frames_contribute_nothing(name):
    logits, units, f2p, teacher, _ = _make_batch(seed=5)
    lengths = torch.tensor([1.0, 0.6])  # utterance 2: frames 3 and 4 are padding
    fn = _loss_fns(units, teacher)[name]
    masked = (f2p < 0).clone()
    masked[1, 3:] = True
    results = []
    for scale in (1.0, 50.0):
        lg = logits.clone()
        lg[masked] = lg[masked] * scale + 7.0  # change only masked frames
        lg.requires_grad_(True)
        loss = fn(lg, f2p, lengths)
        loss.backward()
        results.append((loss.detach(), lg.grad))
    (loss_a, grad_a), (loss_b, grad_b) = results
    assert torch.equal(loss_a, loss_b)
    assert torch.equal(grad_a, grad_b)
    assert torch.all(grad_a[masked] == 0)
    assert torch.any(grad_a[~masked] != 0)


def test_gather_teacher_to_frames_matches_loop():
    _, _, f2p, teacher, _ = _make_batch(seed=6, k=3)
    probs, ids, rest = gather_teacher_to_frames(*teacher, f2p)
    assert probs.shape == (2, 5, 3) and rest.shape == (2, 5)
    for b, t, k in _frames(f2p):
        assert torch.equal(probs[b, t], teacher[0][b, k])
        assert torch.equal(ids[b, t], teacher[1][b, k])
        assert rest[b, t] == teacher[2][b, k]


def test_alignment_beyond_the_unit_sequence_is_a_clear_error():
    logits, units, _, teacher, _ = _make_batch()
    bad = torch.tensor([[0, 1, 2, 3, 3], [0, 0, 0, 0, 0]])
    with pytest.raises(ValueError, match="unit position 3"):
        distillation_loss(logits, teacher, bad)
    with pytest.raises(ValueError, match="encoder frame rate"):
        frame_ce_loss(logits[:, :4], units, bad)


def test_batch_without_any_unit_gives_zero():
    logits = torch.randn(2, 3, V, requires_grad=True)
    f2p = torch.full((2, 3), -1)
    teacher = (torch.zeros(2, 0, 2), torch.zeros(2, 0, 2, dtype=torch.long), torch.zeros(2, 0))
    loss = distillation_loss(logits, teacher, f2p)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logits.grad == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_low_precision_is_finite_and_close_to_fp32(dtype):
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, V)
    with torch.no_grad():
        layer.weight.mul_(8.0)  # large logits: a low-precision softmax would saturate
    x = torch.randn(2, 5, 8)
    _, units, f2p, teacher, _ = _make_batch(seed=7)
    teacher32 = (teacher[0].float(), teacher[1], teacher[2].float())
    teacher_low = (teacher[0].to(dtype), teacher[1], teacher[2].to(dtype))

    def losses(logits, tch):
        return torch.stack([
            frame_ce_loss(logits, units, f2p),
            label_interpolation_loss(logits, units, f2p, tch, 0.3),
            distillation_loss(logits, tch, f2p, tau=2.0),
        ])

    reference = losses(layer(x), teacher32)
    with torch.autocast("cpu", dtype=dtype):
        logits = layer(x)
        assert logits.dtype == dtype
        low = losses(logits, teacher_low)
    assert low.dtype == torch.float32
    assert torch.isfinite(low).all()
    assert torch.allclose(low, reference, rtol=0.05, atol=0.05)


def test_hierarchical_combination_and_head_losses():
    torch.manual_seed(0)
    batch, frames = 2, 6
    heads = AuxiliaryHeads(
        senone=AuxiliaryHead("senone", 1, 4, 5, loss="frame_ce", loss_weight=0.3, alpha=0.7),
        subword=AuxiliaryHead("subword", 2, 4, 5, loss="ctc", loss_weight=0.2, alpha=0.5,
                              tau=2.0),
        mono=AuxiliaryHead("monophone", 2, 4, 5, loss="none", alpha=0.0),
    )
    hidden = {1: torch.randn(batch, frames, 4), 2: torch.randn(batch, frames, 4)}
    head_logits = heads(hidden)
    units = torch.tensor([[1, 2, 3], [4, 2, 0]])
    unit_lens = torch.tensor([1.0, 2 / 3])
    f2p = torch.tensor([[0, 0, 1, 2, 2, -1], [-1, 0, 1, 1, -1, -1]])
    probs = torch.tensor([[[0.6, 0.3]] * 3] * 2)
    ids = torch.tensor([[[1, 2], [2, 3], [3, 4]], [[4, 0], [2, 1], [0, 1]]])
    teacher = (probs, ids, torch.full((2, 3), 0.1))
    target = UnitTargets(units, unit_lens, f2p, teacher)
    targets = {"senone": target, "subword": target, "monophone": target}
    frame_lens = torch.tensor([1.0, 5 / 6])
    terms = auxiliary_losses(heads, head_logits, targets, frame_lens)
    assert sorted(terms) == ["ctc_subword", "frame_ce_senone", "kd_senone", "kd_subword"]
    assert terms["kd_senone"][0] == 0.7 and terms["ctc_subword"][0] == 0.2

    # independent references for each term
    kd_sub = _brute_kl(head_logits["subword"][..., :5].detach().double(), teacher, f2p, 2.0)
    assert terms["kd_subword"][1].item() == pytest.approx(kd_sub, rel=1e-5)
    ctc_ref = torch.nn.functional.ctc_loss(
        torch.log_softmax(head_logits["subword"], -1).transpose(0, 1), units,
        torch.tensor([6, 5]), torch.tensor([3, 2]), blank=5, zero_infinity=True)
    assert terms["ctc_subword"][1].item() == pytest.approx(ctc_ref.item(), rel=1e-5)

    main = torch.tensor(3.0)
    total, log = combine_losses(main, terms)
    expected = 3.0 + sum(w * v.item() for w, v in terms.values())
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert set(log) == {"main", "total", *terms}
    assert not any(v.requires_grad for v in log.values())
    total.backward()  # gradients reach every head that has a loss
    assert heads["senone"].projection[0].weight.grad is not None
    assert heads["mono"].projection[0].weight.grad is None


def test_head_with_alpha_but_no_teacher_is_a_clear_error():
    heads = AuxiliaryHeads(sub=AuxiliaryHead("subword", 1, 4, 5, alpha=1.0))
    logits = heads({1: torch.randn(1, 2, 4)})
    targets = {"subword": UnitTargets(torch.tensor([[1]]), torch.ones(1), torch.tensor([[0, 0]]))}
    with pytest.raises(ValueError, match="no teacher"):
        auxiliary_losses(heads, logits, targets)
    with pytest.raises(KeyError, match="carries only"):
        auxiliary_losses(heads, logits, {})


def test_distillation_objective_selects_terms_from_settings():
    logits, units, f2p, teacher, _ = _make_batch(seed=8)
    targets = {"subword": UnitTargets(units, torch.ones(2), f2p, teacher)}
    main = torch.tensor(2.0, dtype=torch.float64)
    heads = AuxiliaryHeads(sub=AuxiliaryHead("subword", 1, 4, V, alpha=0.5))
    head_logits = {"sub": logits * 0.5}

    total, log = DistillationObjective()(main, logits, targets=targets)
    assert set(log) == {"main", "total"} and total.item() == 2.0  # AM alone

    lam = 0.3
    objective = DistillationObjective(label_interpolation=lam, label_interpolation_weight=0.7,
                                      main_blank_index=5, moe_weight=0.1)
    total, log = objective(main, logits, heads, head_logits, targets,
                           moe_loss=torch.tensor(0.4, dtype=torch.float64))
    li = label_interpolation_loss(logits, units, f2p, teacher, lam, blank_index=5)
    kd = _brute_kl(logits * 0.5, teacher, f2p)
    assert set(log) == {"main", "li_main", "kd_sub", "moe", "total"}
    assert log["li_main"].item() == pytest.approx(li.item(), rel=1e-12)
    assert total.item() == pytest.approx(2.0 + 0.7 * li.item() + 0.5 * kd + 0.1 * 0.4,
                                         rel=1e-9)

    # lambda 0: the frame-CE control needs no teacher
    no_teacher = {"subword": UnitTargets(units, torch.ones(2), f2p)}
    _, log = DistillationObjective(label_interpolation=0.0)(main, logits, targets=no_teacher)
    assert torch.equal(log["li_main"], frame_ce_loss(logits, units, f2p))
    with pytest.raises(ValueError, match="needs a teacher"):
        DistillationObjective(label_interpolation=0.3)(main, logits, targets=no_teacher)
    with pytest.raises(ValueError, match=r"in \[0, 1\] or null"):
        DistillationObjective(label_interpolation=1.5)


def test_int32_teacher_ids_are_accepted():
    logits, _, f2p, teacher, _ = _make_batch(seed=9)
    as_int32 = (teacher[0], teacher[1].int(), teacher[2])
    assert distillation_loss(logits, as_int32, f2p).item() == pytest.approx(
        distillation_loss(logits, teacher, f2p).item(), rel=1e-12)


def test_teacher_is_a_fixed_target():
    logits, units, f2p, teacher, _ = _make_batch(seed=10)
    probs = teacher[0].clone().requires_grad_(True)
    rest = teacher[2].clone().requires_grad_(True)
    live = (probs, teacher[1], rest)
    logits.requires_grad_(True)
    loss = distillation_loss(logits, live, f2p) + label_interpolation_loss(
        logits, units, f2p, live, 0.5)
    loss.backward()
    assert logits.grad is not None and probs.grad is None and rest.grad is None


def _ctc_case():
    """Main output over units 0-3 and blank 4: utterance 0 emits unit 1 on frame 1 and unit 2
    on frame 4, blank elsewhere; utterance 1 has one frame for two tokens (unalignable)."""
    peaks = torch.tensor([[4, 1, 4, 4, 2, 4], [4, 4, 4, 4, 4, 4]])
    logits = 3.0 * F.one_hot(peaks, 5).double()
    logits = logits + 0.3 * torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(4),
                                        dtype=torch.float64)
    units = torch.tensor([[1, 2], [3, 0]])
    unit_lens = torch.tensor([1.0, 1.0])
    f2p = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1]])  # prep alignment: all frames
    probs = torch.tensor([[[0.6, 0.3], [0.5, 0.4]], [[0.7, 0.2], [0.9, 0.05]]],
                         dtype=torch.float64)
    ids = torch.tensor([[[1, 0], [2, 3]], [[3, 2], [0, 1]]])
    teacher = (probs, ids, 1.0 - probs.sum(-1))
    frame_lens = torch.tensor([1.0, 1 / 6])
    return logits, UnitTargets(units, unit_lens, f2p, teacher), frame_lens


def test_ctc_frames_put_the_li_target_on_the_frames_the_ctc_path_emits_a_token_on():
    logits, target, frame_lens = _ctc_case()
    objective = DistillationObjective(label_interpolation=0.3, main_blank_index=4,
                                      label_interpolation_frames="ctc")
    positions = objective.frame_positions(logits, target, frame_lens)
    assert positions.tolist() == [[-1, 0, -1, -1, 1, -1], [-1] * 6]
    logits.requires_grad_(True)
    _, log = objective(torch.tensor(0.0, dtype=torch.float64), logits,
                       targets={"subword": target}, frame_lens=frame_lens)
    expected = label_interpolation_loss(logits, target.units, positions, target.teacher, 0.3,
                                        lengths=frame_lens, blank_index=4)
    assert log["li_main"].item() == pytest.approx(expected.item(), rel=1e-12)
    # the alignment variant trains every frame of the prep's spans instead
    old = DistillationObjective(label_interpolation=0.3, main_blank_index=4)
    assert torch.equal(old.frame_positions(logits, target), target.frame_to_position)


def test_ctc_frames_give_no_gradient_to_blank_frames_or_an_unalignable_utterance():
    logits, target, frame_lens = _ctc_case()
    logits.requires_grad_(True)
    objective = DistillationObjective(label_interpolation=0.3, main_blank_index=4,
                                      label_interpolation_frames="ctc")
    total, _ = objective(torch.tensor(0.0, dtype=torch.float64), logits,
                         targets={"subword": target}, frame_lens=frame_lens)
    total.backward()
    per_frame = logits.grad.abs().sum(-1)
    assert torch.all(per_frame[0, [1, 4]] > 0)
    assert torch.all(per_frame[0, [0, 2, 3, 5]] == 0)
    assert torch.all(per_frame[1] == 0) and torch.isfinite(total)
    # with the prep alignment every frame of utterance 0 gets gradient, blank frames too
    logits.grad = None
    old = DistillationObjective(label_interpolation=0.3, main_blank_index=4)
    old(torch.tensor(0.0, dtype=torch.float64), logits, targets={"subword": target})[0].backward()
    assert torch.all(logits.grad.abs().sum(-1)[0] > 0)


def test_ctc_frames_align_the_given_ctc_targets_and_refuse_other_sequences():
    logits, target, frame_lens = _ctc_case()
    objective = DistillationObjective(label_interpolation=0.3, main_blank_index=4,
                                      label_interpolation_frames="ctc")
    # the same sequences in another dtype and with other padding past their lengths
    stored = UnitTargets(torch.tensor([[1, 2], [3, 2]], dtype=torch.int32),
                         torch.tensor([1.0, 0.5]), target.frame_to_position)
    tokens = (torch.tensor([[1, 2], [3, 0]]), torch.tensor([1.0, 0.5]))
    positions = objective.frame_positions(logits, stored, frame_lens, tokens)
    assert positions[0].tolist() == [-1, 0, -1, -1, 1, -1]
    with pytest.raises(ValueError, match="differ from the 'subword' unit sequences"):
        objective.frame_positions(logits, target, frame_lens, (torch.tensor([[1, 3], [3, 0]]),
                                                               target.unit_lens))
    with pytest.raises(ValueError, match="differ from the 'subword' unit sequences"):
        objective.frame_positions(logits, target, frame_lens, (torch.tensor([[1, 2, 3]] * 2),
                                                               target.unit_lens))
    with pytest.raises(ValueError, match="needs main_blank_index"):
        DistillationObjective(label_interpolation=0.3, label_interpolation_frames="ctc")(
            torch.tensor(0.0), logits, targets={"subword": target})
    with pytest.raises(ValueError, match="label_interpolation_frames must be one of"):
        DistillationObjective(label_interpolation=0.3, label_interpolation_frames="blank")
