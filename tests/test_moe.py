"""MoE layer: routing, fast kernels against a plain reference, padding, balancing, checkpoints."""

import copy
import math

import pytest
import torch
from host_reads import HostReads
from speechbrain.utils.checkpoints import Checkpointer
from torch import nn

from sb_crossmodal_kd.nnet.moe import (
    MoE,
    collect_expert_stats,
    grouped_matmul,
    moe_auxiliary_loss,
    padding_mask,
    set_moe_epoch,
)


def reference_forward(moe, x, mask):
    """sum_i g_i(x) f_i(x) written out expert by expert, with plain torch ops only."""
    flat = x.reshape(-1, x.shape[-1])
    valid = mask.reshape(-1)
    logits = moe.router.net(flat)
    probs = torch.softmax(logits, dim=-1)
    if moe.top_k is not None:
        top_w, top_i = probs.topk(moe.top_k, dim=-1)
        gates = torch.zeros_like(probs).scatter(1, top_i, top_w / top_w.sum(-1, keepdim=True))
    else:
        gates = probs
    gates = gates * valid.unsqueeze(-1)
    ex = moe.experts
    out = 0
    for i in range(moe.num_experts):
        pre = flat @ ex.w_in[i]
        if ex.b_in is not None:
            pre = pre + ex.b_in[i]
        if ex.expert == "swiglu":
            g, u = pre.chunk(2, dim=-1)
            h = torch.nn.functional.silu(g) * u
        else:
            h = torch.relu(pre)
        if ex.expert != "relu":
            h = h @ ex.w_out[i]
            if ex.b_out is not None:
                h = h + ex.b_out[i]
        out = out + gates[:, i : i + 1] * h
    return out.view(x.shape[0], x.shape[1], -1)


# The kernel tests also run on CUDA where one is present (CI has none: CPU only there).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def skip_without_grouped_mm(device):
    """Skips a test of the ``grouped_mm`` kernel where this torch has no ``torch._grouped_mm``
    for ``device`` (on the CPU: before torch 2.9; the "auto" kernel falls back there)."""
    try:
        torch._grouped_mm(torch.ones(4, 8, device=device), torch.ones(2, 8, 4, device=device),
                          offs=torch.tensor([2, 4], dtype=torch.int32, device=device))
    except (AttributeError, RuntimeError):  # NotImplementedError is a RuntimeError
        pytest.skip(f"torch {torch.__version__} has no torch._grouped_mm on {device}")


@pytest.fixture(autouse=True)
def full_float32_matmul():
    """Importing SpeechBrain turns TF32 on for CUDA matmuls (its ``allow_tf32`` quirk);
    comparisons with the reference at float32 tolerances need it off."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def make_mask(batch=3, time=7):
    lengths = torch.tensor([1.0, 4 / 7, 2 / 7])[:batch]
    return torch.arange(time) < torch.round(lengths * time).unsqueeze(1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("expert", ["relu", "ffn", "swiglu"])
@pytest.mark.parametrize("routing", ["dense", "grouped_mm", "loop", "per_expert"])
def test_fast_kernels_equal_reference_in_outputs_and_gradients(expert, routing, device):
    if routing == "grouped_mm":
        skip_without_grouped_mm(device)
    torch.manual_seed(0)
    top_k = None if routing == "dense" else 2
    kernel = "auto" if routing == "dense" else routing
    moe = MoE(16, num_experts=4, output_size=8, expert=expert, expert_hidden_size=16,
              top_k=top_k, kernel=kernel).to(device)
    mask = make_mask().to(device)
    x = torch.randn(3, 7, 16, device=device, requires_grad=True)
    target = torch.randn(3, 7, 8, device=device)

    y = moe(x, mask=mask)
    ((y - target) ** 2).sum().backward()
    grads = {n: p.grad.clone() for n, p in moe.named_parameters()}
    x_grad = x.grad.clone()
    moe.zero_grad()
    x.grad = None

    y_ref = reference_forward(moe, x, mask)
    ((y_ref - target) ** 2).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_grad, x.grad, rtol=1e-4, atol=1e-5)
    for name, param in moe.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("expert", ["ffn", "swiglu"])
def test_per_expert_kernel_with_an_unused_expert_equals_reference(expert):
    # An expert no frame chose must come out with exactly zero weight gradients, and padding
    # rows with no gradient at all.
    torch.manual_seed(0)
    moe = MoE(16, num_experts=4, output_size=8, expert=expert, expert_hidden_size=16,
              top_k=2, kernel="per_expert")
    with torch.no_grad():
        moe.router.net.bias[3] = -100.0
    mask = make_mask()
    x = torch.randn(3, 7, 16, requires_grad=True)
    results = []
    for forward in (moe, lambda inp, mask: reference_forward(moe, inp, mask)):
        y = forward(x, mask=mask)
        (y * torch.linspace(-1, 1, 8)).sum().backward()
        results.append([y.detach(), x.grad.clone()] + [p.grad.clone() for p in moe.parameters()])
        moe.zero_grad()
        x.grad = None
    for fast, ref in zip(*results, strict=True):
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
    names = [name for name, _ in moe.named_parameters()]
    for name in ("experts.w_in", "experts.w_out"):
        assert torch.count_nonzero(results[0][2 + names.index(name)][3]) == 0, name
    assert torch.count_nonzero(results[0][1][~mask]) == 0


@pytest.mark.parametrize("expert", ["relu", "ffn"])
def test_dense_gating_over_several_row_blocks_equals_reference(expert):
    # Large CPU batches are computed in blocks of rows (here 256 rows: three blocks).
    torch.manual_seed(0)
    moe = MoE(8, num_experts=4, output_size=6, expert=expert, expert_hidden_size=2048)
    if expert == "relu":
        moe = MoE(8, num_experts=4, output_size=2048)
    mask = torch.arange(350) < torch.tensor([[350], [300]])
    x = torch.randn(2, 350, 8, requires_grad=True)
    results = []
    for forward in (moe, lambda inp, mask: reference_forward(moe, inp, mask)):
        y = forward(x, mask=mask)
        (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        results.append([y.detach(), x.grad.clone()] + [p.grad.clone() for p in moe.parameters()])
        moe.zero_grad()
        x.grad = None
    for fast, ref in zip(*results, strict=True):
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_grouped_matmul_kernels_agree_with_empty_groups(device):
    skip_without_grouped_mm(device)
    torch.manual_seed(0)
    x = torch.randn(12, 8, device=device, requires_grad=True)
    w = torch.randn(4, 8, 4, device=device, requires_grad=True)
    offsets = torch.tensor([3, 3, 9, 12], dtype=torch.int32, device=device)  # expert 1: none
    outs = []
    for kernel in ("grouped_mm", "loop"):
        y = grouped_matmul(x, w, offsets, kernel)
        y.backward(torch.ones_like(y) * 0.5 + y.detach())
        outs.append((y.detach(), x.grad.clone(), w.grad.clone()))
        x.grad = w.grad = None
    for a, b in zip(outs[0], outs[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dense_gates_sum_to_one_and_top_k_selects_k():
    torch.manual_seed(0)
    x = torch.randn(50, 16)
    valid = torch.ones(50, dtype=torch.bool)
    dense = MoE(16, num_experts=5)
    _, probs, _, _ = dense.route(x, valid)
    torch.testing.assert_close(probs.sum(-1), torch.ones(50))
    sparse = MoE(16, num_experts=5, top_k=3)
    _, probs, top_w, top_i = sparse.route(x, valid)
    torch.testing.assert_close(top_w.sum(-1), torch.ones(50))
    assert top_i.shape == (50, 3)
    assert all(len(set(row.tolist())) == 3 for row in top_i)
    # the selected experts are the three most probable ones
    assert torch.equal(top_i.sort(-1).values, probs.topk(3, -1).indices.sort(-1).values)
    sparse(x.view(5, 10, 16))
    stats = collect_expert_stats(sparse)["moe"]
    assert sum(stats["routed_fraction"]) == pytest.approx(1.0)
    assert float(sparse.stat_routed_count.sum()) == 3 * 50


def test_renormalised_top_k_gates_are_the_selected_probabilities_rescaled():
    # Mixtral's gates: softmax over all experts, the k largest, divided by their sum; ours
    # come from a softmax over the k selected logits: the same values and router gradients.
    torch.manual_seed(0)
    x = torch.randn(40, 16)
    moe = MoE(16, num_experts=6, top_k=3)
    logits, _, top_w, top_i = moe.route(x, None)
    (grad,) = torch.autograd.grad((top_w * torch.arange(3.0)).sum(), moe.router.net.weight)
    probs = torch.softmax(moe.router(x), dim=-1)
    ref_w, ref_i = probs.topk(3, dim=-1)
    ref_w = ref_w / ref_w.sum(-1, keepdim=True)
    (ref_grad,) = torch.autograd.grad((ref_w * torch.arange(3.0)).sum(), moe.router.net.weight)
    assert torch.equal(top_i, ref_i)
    torch.testing.assert_close(top_w, ref_w)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("top_k", [None, 2])
def test_a_training_step_reads_nothing_back_to_the_host_on_the_gpu_path(top_k, monkeypatch):
    # A value read on the host (item(), boolean indexing, .tolist()) stalls a GPU step until
    # the device catches up. The GPU code path, run here on the CPU: one grouped product per
    # projection, no per-expert slicing; with padding, capacity, both auxiliary losses,
    # statistics and (dense) the balancing constraint.
    import sb_crossmodal_kd.nnet.moe.experts as experts_module

    if top_k:
        skip_without_grouped_mm("cpu")
    monkeypatch.setattr(experts_module, "_cpu_eager", lambda x: False)
    torch.manual_seed(0)
    moe = MoE(8, num_experts=4, expert="swiglu", expert_hidden_size=16, top_k=top_k,
              capacity_factor=1.0 if top_k else None, load_balancing_weight=0.1,
              z_loss_weight=0.01, balance_margin=None if top_k else 2.0,
              kernel="grouped_mm" if top_k else "auto")
    x = torch.randn(3, 7, 8, requires_grad=True)
    mask = make_mask()
    moe(x, mask=mask)  # first call: lazy setup outside the watch
    with HostReads() as watch:
        y = moe(x, mask=mask)
        (y.pow(2).sum() + moe_auxiliary_loss(moe)).backward()
    assert watch.reads == []


@pytest.mark.parametrize("top_k", [None, 2])
def test_padding_frames_excluded_from_outputs_losses_and_statistics(top_k):
    torch.manual_seed(0)
    moe = MoE(8, num_experts=4, top_k=top_k, load_balancing_weight=0.1, z_loss_weight=0.01,
              capacity_factor=1.0 if top_k else None, balance_margin=5.0)
    moe.train()
    mask = make_mask()
    x = torch.randn(3, 7, 8)
    x_other = torch.where(mask.unsqueeze(-1), x, 100 * torch.randn(3, 7, 8))

    results = []
    for inp in (x, x_other):
        state = copy.deepcopy(moe.state_dict())
        y = moe(inp, mask=mask)
        loss = moe_auxiliary_loss(moe)
        stats = collect_expert_stats(moe, reset=True)["moe"]
        totals = moe.constraint.totals.clone()
        results.append((y, loss, stats, totals, moe.last_assignment.clone()))
        moe.load_state_dict(state)
    (y1, l1, s1, t1, a1), (y2, l2, s2, t2, a2) = results
    assert torch.count_nonzero(y1[~mask]) == 0
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(t1, t2)
    assert s1 == s2
    assert s1["frames"] == int(mask.sum())
    assert torch.equal(a1, a2) and bool((a1[~mask] == -1).all())


@pytest.mark.parametrize("top_k", [None, 2])
def test_auxiliary_losses_and_statistics_follow_their_definitions_over_real_frames(top_k):
    torch.manual_seed(0)
    moe = MoE(8, num_experts=4, top_k=top_k, load_balancing_weight=0.3, z_loss_weight=0.02)
    mask = make_mask()
    x = torch.randn(3, 7, 8)
    moe(x, mask=mask)
    loss = moe_auxiliary_loss(moe)
    stats = collect_expert_stats(moe)["moe"]

    logits = moe.router(x[mask])  # the real frames only
    probs = torch.softmax(logits, dim=-1)
    chosen = probs.argmax(-1, keepdim=True) if top_k is None else probs.topk(top_k, -1).indices
    fraction = torch.zeros(4).scatter_add_(0, chosen.flatten(), torch.ones(chosen.numel()))
    fraction = fraction / fraction.sum()
    balance = 0.3 * 4 * (fraction * probs.mean(0)).sum()
    z_loss = 0.02 * torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(loss, balance + z_loss)

    if top_k is None:
        gates = probs
    else:
        top_w = probs.gather(1, chosen)
        gates = torch.zeros_like(probs).scatter(1, chosen, top_w / top_w.sum(-1, keepdim=True))
    assert stats["frames"] == int(mask.sum())
    assert stats["usage"] == pytest.approx(gates.mean(0).tolist(), rel=1e-5)
    entropy = -(probs * probs.log()).sum(-1).mean()
    assert stats["gate_entropy"] == pytest.approx(float(entropy), rel=1e-5)
    top1 = torch.bincount(probs.argmax(-1), minlength=4) / mask.sum()
    assert stats["top1_usage"] == pytest.approx(top1.tolist())
    if top_k is not None:
        assert stats["routed_fraction"] == pytest.approx(fraction.tolist())


def test_relative_lengths_and_context_mask_match_explicit_mask():
    torch.manual_seed(0)
    moe = MoE(8, num_experts=3, top_k=1)
    x = torch.randn(3, 7, 8)
    mask = make_mask()
    lengths = torch.tensor([1.0, 4 / 7, 2 / 7])
    y_mask = moe(x, mask=mask)
    y_len = moe(x, lengths=lengths)
    with padding_mask(nn.Sequential(moe), lengths=lengths):
        y_ctx = moe(x)
    torch.testing.assert_close(y_mask, y_len)
    torch.testing.assert_close(y_mask, y_ctx)
    assert moe.padding_context is None


def test_balancing_constraint_keeps_totals_within_margin_then_switches_off():
    torch.manual_seed(0)
    margin, batch = 4.0, 20
    moe = MoE(8, num_experts=4, balance_margin=margin, balance_steps=30)
    with torch.no_grad():  # a router that sends everything to expert 0
        moe.router.net.weight.zero_()
        moe.router.net.bias.copy_(torch.tensor([8.0, 0.0, 0.0, 0.0]))
    moe.train()
    for _ in range(30):
        moe(torch.randn(1, batch, 8))
        spread = float(moe.constraint.totals.max() - moe.constraint.totals.min())
        # decided per batch: at most one batch's gate mass beyond the margin
        assert spread <= margin + batch
    usage = collect_expert_stats(moe, reset=True)["moe"]["usage"]
    assert min(usage) > 0.15  # every expert used despite the collapsed router
    assert not moe.constraint.active  # phase one over after 30 steps
    frozen = moe.constraint.totals.clone()
    moe(torch.randn(1, batch, 8))
    assert torch.equal(frozen, moe.constraint.totals)
    assert collect_expert_stats(moe)["moe"]["usage"][0] > 0.99  # gates as the router says


@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("chunk", [1, 7])
def test_chunked_constraint_keeps_totals_within_margin_plus_chunk(chunk, top_k):
    torch.manual_seed(0)
    margin = 3.0
    moe = MoE(8, num_experts=4, top_k=top_k, balance_margin=margin,
              balance_chunk_size=chunk).train()
    with torch.no_grad():  # a router that sends everything to expert 0
        moe.router.net.weight.zero_()
        moe.router.net.bias.copy_(torch.tensor([8.0, 0.0, 0.0, 0.0]))
    constraint = moe.constraint
    spreads = []
    record = constraint.record

    def record_and_watch(gates, valid):  # observe the totals after every chunk
        record(gates, valid)
        spreads.append(float(constraint.totals.max() - constraint.totals.min()))

    constraint.record = record_and_watch
    moe(torch.randn(2, 20, 8), mask=make_mask(2, 20))
    assert len(spreads) == -(-40 // chunk)
    assert max(spreads) <= margin + chunk + 1e-5
    assert constraint.steps == 1


def test_balancing_constraint_phase_in_epochs():
    moe = MoE(8, num_experts=2, balance_margin=0.0, balance_epochs=2).train()
    set_moe_epoch(moe, 2)
    assert moe.constraint.active
    set_moe_epoch(moe, 3)
    assert not moe.constraint.active
    moe.eval()
    set_moe_epoch(moe, 1)
    assert not moe.constraint.active  # never in evaluation


def test_without_constraint_collapsed_router_stays_collapsed():
    moe = MoE(8, num_experts=4).train()
    with torch.no_grad():
        moe.router.net.weight.zero_()
        moe.router.net.bias.copy_(torch.tensor([8.0, 0.0, 0.0, 0.0]))
    moe(torch.randn(1, 20, 8))
    assert collect_expert_stats(moe)["moe"]["usage"][0] > 0.99


def test_constraint_state_survives_checkpointer_round_trip(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(MoE(8, num_experts=4, top_k=2, balance_margin=3.0, balance_epochs=5))
    model.train()
    for _ in range(7):
        model(torch.randn(2, 5, 8))
    set_moe_epoch(model, 4)
    Checkpointer(tmp_path, recoverables={"model": model}).save_checkpoint()

    restored = nn.Sequential(MoE(8, num_experts=4, top_k=2, balance_margin=3.0, balance_epochs=5))
    Checkpointer(tmp_path, recoverables={"model": restored}).recover_if_possible()
    before, after = model[0].constraint, restored[0].constraint
    assert float(before.totals.abs().sum()) > 0
    assert torch.equal(before.totals, after.totals)
    assert (after.steps, after.epoch) == (7, 4)
    x = torch.randn(2, 5, 8)
    restored.train()
    torch.testing.assert_close(model(x), restored(x))
    assert torch.equal(before.totals, after.totals)


def test_auxiliary_losses_have_known_values_and_reach_the_router():
    moe = MoE(8, num_experts=4, top_k=2, load_balancing_weight=1.0)
    with torch.no_grad():
        moe.router.net.weight.zero_()
        moe.router.net.bias.zero_()
    moe(torch.randn(2, 5, 8))
    # uniform router: N * sum_i f_i * (1/N) = sum_i f_i = 1
    assert float(moe_auxiliary_loss(moe).detach()) == pytest.approx(1.0)

    zl = MoE(8, num_experts=4, z_loss_weight=1.0)
    with torch.no_grad():
        zl.router.net.weight.zero_()
        zl.router.net.bias.zero_()
    model = nn.Sequential(zl, MoE(8, num_experts=2, load_balancing_weight=0.5))
    model(torch.randn(2, 5, 8))
    loss = moe_auxiliary_loss(model)
    assert float(loss.detach()) > math.log(4) ** 2  # z-loss of a zero router plus a positive term
    loss.backward()
    assert model[1].router.net.weight.grad.abs().sum() > 0
    assert float(moe_auxiliary_loss(model)) == 0.0  # collected once


def test_top_1_router_learns_from_the_task_loss():
    # One renormalised gate is always 1: the router would get no gradient from the output.
    # By default top-1 scales the expert by its raw probability (Switch Transformer).
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    grads = {}
    for renormalize in (None, True):
        moe = MoE(8, num_experts=4, expert="ffn", expert_hidden_size=16, top_k=1,
                  renormalize_top_k=renormalize)
        moe(x).pow(2).sum().backward()
        grads[renormalize] = moe.router.net.weight.grad.abs().sum()
    assert grads[None] > 0
    assert grads[True] < 1e-4 * grads[None]  # zero but for rounding
    assert MoE(8, num_experts=4, top_k=2).renormalize_top_k  # Mixtral's top-2


def test_capacity_limits_assignments_per_expert():
    moe = MoE(8, num_experts=4, top_k=1, capacity_factor=1.0)
    with torch.no_grad():  # everyone wants expert 2
        moe.router.net.weight.zero_()
        moe.router.net.bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
    mask = make_mask()
    y = moe(torch.randn(3, 7, 8), mask=mask)
    frames = int(mask.sum())
    capacity = math.ceil(frames / 4)
    assert moe.stat_routed_count.tolist() == [0, 0, capacity, 0]
    stats = collect_expert_stats(moe)["moe"]
    assert stats["dropped_fraction"] == pytest.approx((frames - capacity) / frames)
    flat_valid = y.reshape(-1, 8)[mask.reshape(-1)]
    assert int((flat_valid.abs().sum(-1) > 0).sum()) <= capacity


@pytest.mark.parametrize("kernel", ["auto", "per_expert"])
def test_capacity_serves_first_choices_before_second_choices(kernel):
    # Frames 0-3 rank experts (0, 1), frames 4-7 rank them (1, 0); each expert has room for
    # 2 of its 8 requests. Expert e outputs the unit vector e, so the output shows who got in.
    moe = MoE(8, num_experts=4, top_k=2, capacity_factor=0.5, kernel=kernel, track_stats=False)
    with torch.no_grad():
        moe.router.net.weight.copy_(torch.eye(4, 8))  # logits = the first 4 inputs
        moe.router.net.bias.zero_()
        moe.experts.w_in.zero_()
        moe.experts.b_in.copy_(torch.eye(4, 8))
    x = torch.zeros(1, 8, 8)
    x[0, :4, :2] = torch.tensor([3.0, 2.0])
    x[0, 4:, :2] = torch.tensor([2.0, 3.0])
    served = moe(x)[0, :, :2] > 0  # [frame, expert]
    expected = torch.zeros(8, 2, dtype=torch.bool)
    expected[:2, 0] = True  # expert 0: the first two of its four first choices
    expected[4:6, 1] = True  # expert 1: likewise, before frames 0-3's second choices
    assert torch.equal(served, expected)


@pytest.mark.parametrize("kernel", ["auto", "per_expert"])
@pytest.mark.parametrize("expert", ["relu", "ffn", "swiglu"])
def test_gradients_with_padding_and_dropped_assignments_match_finite_differences(expert, kernel):
    # Padding pairs and pairs over capacity are never computed by the experts (their rows
    # hold arbitrary values); no trace of them may reach any gradient.
    torch.manual_seed(0)
    moe = MoE(6, num_experts=3, output_size=4, expert=expert, expert_hidden_size=5, top_k=2,
              capacity_factor=0.5, kernel=kernel).double()
    mask = make_mask()
    x = torch.randn(3, 7, 6, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in moe.named_parameters()]

    def run(inp, *params):
        out = torch.func.functional_call(moe, dict(zip(names, params, strict=True)), (inp,),
                                         {"mask": mask})
        return out * torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).view_as(out)

    moe(x, mask=mask)
    assert collect_expert_stats(moe, reset=True)["moe"]["dropped_fraction"] > 0
    assert torch.autograd.gradcheck(run, (x, *moe.parameters()), eps=1e-6, atol=1e-6)


def test_noisy_gating_is_random_in_training_only():
    torch.manual_seed(0)
    moe = MoE(8, num_experts=4, top_k=1, noisy_gating=True)
    x = torch.randn(2, 30, 8)
    moe.train()
    assert not torch.equal(moe(x), moe(x))
    moe.eval()
    assert torch.equal(moe(x), moe(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("top_k", [None, 2])
def test_bfloat16_autocast_matches_float32_within_bf16_precision(top_k, device):
    torch.manual_seed(0)
    moe = MoE(64, num_experts=4, expert="swiglu", expert_hidden_size=128, top_k=top_k).to(device)
    x = torch.randn(4, 50, 64, device=device, requires_grad=True)
    y_ref = moe(x)
    (g_ref,) = torch.autograd.grad(y_ref.pow(2).sum(), x)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = moe(x)
    (g,) = torch.autograd.grad(y.float().pow(2).sum(), x)
    # bf16 operands: relative error between 1e-3 and 1e-2 is rounding, not a wrong kernel
    assert float((y.float() - y_ref).norm() / y_ref.norm()) < 2e-2
    assert float((g - g_ref).norm() / g_ref.norm()) < 3e-2


@pytest.fixture
def fresh_dynamo():
    """Compilations of other tests' layers count towards Dynamo's recompile limit (one cache
    per code object, whichever instance it ran on): start and end with an empty cache."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
@pytest.mark.parametrize("routing", ["dense", "auto", "loop"])
@pytest.mark.usefixtures("fresh_dynamo")
def test_torch_compile_traces_the_layer_as_one_graph_and_matches_eager(routing, amp):
    # One graph (fullgraph=True raises on any graph break): what CUDA graphs need, and what
    # SpeechBrain's --compile gets. float32 top-k is the case that used to break (the loop
    # over slices has data-dependent shapes), bf16 SwiGLU the one whose backward did.
    torch.manual_seed(0)
    top_k = None if routing == "dense" else 2
    moe = MoE(16, num_experts=4, expert="swiglu", expert_hidden_size=32, top_k=top_k,
              capacity_factor=1.0 if top_k else None, load_balancing_weight=0.01,
              kernel="auto" if routing == "dense" else routing)
    mask = make_mask()
    x = torch.randn(3, 7, 16, requires_grad=True)
    # graph capture without a C compiler
    compiled = torch.compile(moe, backend="aot_eager", fullgraph=True)
    results = []
    for module in (moe, compiled):
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            y = module(x, mask=mask)
        (y.float().pow(2).sum() + moe_auxiliary_loss(moe)).backward()
        results.append([y.detach(), x.grad.clone()] + [p.grad.clone() for p in moe.parameters()])
        moe.zero_grad()
        x.grad = None
    for eager, traced in zip(*results, strict=True):
        if amp is None:
            torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-6)
        else:  # the traced graph may round bf16 intermediates in another order
            assert float((traced - eager).norm() / eager.norm()) < 1e-2


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_top_k_marks_its_host_syncing_products_for_cuda_graphs(amp):
    # mode="reduce-overhead" records CUDA graphs, which cannot hold a device-to-host copy:
    # the float32 grouped products read their offsets on the host, so inductor must see them
    # as cudagraph-unsafe (it then records the graph around them); bf16 stays one native
    # torch._grouped_mm, so nothing in that graph may be excluded.
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    if amp is not None:
        skip_without_grouped_mm("cpu")
    graphs = []

    def keep(graph, example_inputs):
        graphs.append(graph)
        return make_boxed_func(graph.forward)

    torch.manual_seed(0)
    moe = MoE(16, num_experts=4, expert="swiglu", expert_hidden_size=32, top_k=2)
    compiled = torch.compile(moe, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep),
                             fullgraph=True)
    x = torch.randn(2, 5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
        y = compiled(x)
    y.float().sum().backward()
    assert len(graphs) == 2  # forward and backward

    def targets(graph):
        return [node.target for node in graph.graph.nodes if node.op == "call_function"]

    ours = [t for g in graphs for t in targets(g) if "sb_crossmodal_kd" in str(t)]
    unsafe = [t for g in graphs for t in targets(g)
              if isinstance(t, torch._ops.OpOverload) and torch.Tag.cudagraph_unsafe in t.tags]
    if amp is None:
        # forward: two products; backward: their input and weight gradients
        assert len(ours) == 6 and unsafe == ours
    else:
        assert ours == [] and unsafe == []
        assert any("_grouped_mm" in str(t) for g in graphs for t in targets(g))


@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_layer_mutates_only_static_inputs(top_k):
    # CUDA graph trees (mode="reduce-overhead") skip any graph that writes into an input
    # whose address may change; the layer's in-graph writes (usage counters, the constraint's
    # totals) must all go to inputs torch.compile holds fixed, as it does parameters.
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._guards import TracingContext

    writes = []

    def inspect(graph, example_inputs):
        meta = TracingContext.get().fw_metadata
        mutated = {i for i, info in enumerate(meta.input_info) if info.mutates_data}
        writes.append((mutated, set(meta.static_input_indices)))
        return make_boxed_func(graph.forward)

    torch.manual_seed(0)
    moe = MoE(8, num_experts=4, top_k=top_k, load_balancing_weight=0.01,
              balance_margin=None if top_k else 2.0)
    backend = aot_autograd(fw_compiler=inspect,
                           bw_compiler=lambda graph, inputs: make_boxed_func(graph.forward))
    compiled = torch.compile(moe, backend=backend)
    compiled(torch.randn(2, 5, 8, requires_grad=True), mask=make_mask(2, 5)).sum().backward()
    assert any(mutated for mutated, _ in writes)  # the counters are written in a graph
    for mutated, static in writes:
        assert mutated <= static


@pytest.mark.usefixtures("fresh_dynamo")
def test_balancing_constraint_under_torch_compile_matches_eager_without_recompiling():
    torch.manual_seed(0)
    eager = MoE(8, num_experts=3, output_size=8, balance_margin=1.0, balance_steps=3,
                load_balancing_weight=0.01)
    with torch.no_grad():
        eager.router.net.bias.copy_(torch.tensor([3.0, 0.0, 0.0]))  # collapsed: it must act
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, backend="aot_eager")
    mask = make_mask()
    for step in range(6):
        x = torch.randn(3, 7, 8)
        set_moe_epoch(eager, 1 + step // 2)
        set_moe_epoch(twin, 1 + step // 2)
        # after the first step's compilations, a change of step, epoch or phase (off after
        # step 3) must not compile anything again
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            y_twin = compiled(x, mask=mask)
        torch.testing.assert_close(y_twin, eager(x, mask=mask), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(twin.constraint.totals, eager.constraint.totals)
    assert twin.constraint.steps == eager.constraint.steps == 3
    assert float(eager.constraint.totals.max()) > 0


@pytest.mark.parametrize(
    "kwargs, setting",
    [
        ({"num_experts": 4, "top_k": 5}, "top_k"),
        ({"num_experts": 4, "top_k": 0}, "top_k"),
        ({"num_experts": 0}, "num_experts"),
        ({"num_experts": 4, "balance_margin": -1.0}, "balance_margin"),
        ({"num_experts": 4, "balance_epochs": 2}, "balance_margin"),
        ({"num_experts": 4, "balance_margin": 1.0, "balance_chunk_size": 0},
         "balance_chunk_size"),
        ({"num_experts": 4, "capacity_factor": 1.0}, "capacity_factor"),
        ({"num_experts": 4, "top_k": 1, "capacity_factor": 0.0}, "capacity_factor"),
        ({"num_experts": 4, "expert": "ffn"}, "hidden_size"),
        ({"num_experts": 4, "expert": "gelu"}, "expert"),
        ({"num_experts": 4, "kernel": "cuda"}, "kernel"),
        ({"num_experts": 4, "load_balancing_weight": -1}, "load_balancing_weight"),
    ],
)
def test_impossible_settings_fail_at_construction(kwargs, setting):
    with pytest.raises(ValueError, match=setting):
        MoE(8, **kwargs)


def test_mismatched_sizes_fail_with_clear_message():
    moe = MoE(8, num_experts=2)
    with pytest.raises(ValueError, match="input_size=8"):
        moe(torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="padding mask"):
        moe(torch.randn(2, 3, 8), mask=torch.ones(2, 4, dtype=torch.bool))


def test_training_without_collecting_the_balancing_loss_warns_once():
    # A user's own Brain that never adds moe_auxiliary_loss gets told, once per layer.
    import warnings

    x = torch.randn(2, 5, 8)
    layer = MoE(8, 4, top_k=2, load_balancing_weight=0.01).train()
    with pytest.warns(UserWarning, match=r"moe_auxiliary_loss\(model\)") as seen:
        for _ in range(3):
            layer(x).sum().backward()
    assert len([w for w in seen if "MoE layer" in str(w.message)]) == 1
    collected = MoE(8, 4, top_k=2, load_balancing_weight=0.01).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            (collected(x).sum() + moe_auxiliary_loss(collected)).backward()
        with torch.no_grad():  # evaluation passes need no collection
            collected.eval()
            collected(x)
            collected(x)


def test_a_training_loop_that_never_collects_the_aux_losses_is_warned_once(recwarn):
    # A user's own Brain that forgets moe_auxiliary_loss: nothing balances the experts, and
    # the second training step says so, once per layer (never again after).
    import warnings

    from sb_crossmodal_kd.nnet.moe import moe_auxiliary_loss

    model = torch.nn.Sequential(MoE(4, 2, load_balancing_weight=0.01),
                                MoE(4, 2, load_balancing_weight=0.01))
    warnings.simplefilter("always")
    for _ in range(3):
        model(torch.randn(2, 3, 4)).sum().backward()
    told = [w for w in recwarn if "load-balancing / z-loss being collected" in str(w.message)]
    assert len(told) == 2  # once per layer, at its second step only
    recwarn.clear()
    collected = torch.nn.Sequential(MoE(4, 2, load_balancing_weight=0.01))
    for _ in range(3):
        (collected(torch.randn(2, 3, 4)).sum() + moe_auxiliary_loss(collected)).backward()
    assert not [w for w in recwarn if "being collected" in str(w.message)]
