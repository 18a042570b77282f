"""Deep MoE stack: layer wiring, per-layer outputs, padding, training."""

import pytest
import torch

from sb_crossmodal_kd.nnet.dmoe import DeepMoE, DeepMoEClassifier
from sb_crossmodal_kd.nnet.moe import collect_expert_stats, moe_auxiliary_loss, set_moe_epoch


def test_each_layer_gates_on_the_previous_layers_output():
    torch.manual_seed(0)
    encoder = DeepMoE(12, num_layers=3, layer_size=[16, 8, 8], num_experts=[2, 3, 4])
    x = torch.randn(2, 5, 12)
    out, layers = encoder(x)
    expected = x
    for layer, tap in zip(encoder.layers, layers, strict=True):
        expected = layer(expected)
        torch.testing.assert_close(tap, expected)
    torch.testing.assert_close(out, expected)
    assert [t.shape[-1] for t in layers] == [16, 8, 8]
    assert encoder.num_combinations == 2 * 3 * 4


def test_padding_conventions_agree_and_padding_stays_zero():
    torch.manual_seed(0)
    encoder = DeepMoE(6, num_layers=2, layer_size=8, num_experts=3, top_k=2,
                      residual=True, layer_norm=True)
    x = torch.randn(2, 6, 6)
    lengths = torch.tensor([1.0, 0.5])
    pad = torch.tensor([[False] * 6, [False] * 3 + [True] * 3])
    out_len, _ = encoder(x, lengths=lengths)
    out_pad, layers = encoder(x, src_key_padding_mask=pad)
    torch.testing.assert_close(out_len, out_pad)
    for tap in layers:
        assert torch.count_nonzero(tap[1, 3:]) == 0
    stats = collect_expert_stats(encoder)
    assert [s["frames"] for s in stats.values()] == [18.0, 18.0]  # two calls x 9 real frames


def test_per_layer_settings_must_match_num_layers():
    with pytest.raises(ValueError, match="num_experts has 3 entries but num_layers=2"):
        DeepMoE(4, num_layers=2, num_experts=[2, 2, 2])
    with pytest.raises(ValueError, match="top_k"):
        DeepMoE(4, num_layers=2, num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="num_layers"):
        DeepMoE(4, num_layers=0)


def test_classifier_learns_a_toy_frame_task_with_balancing_and_aux_losses():
    torch.manual_seed(0)
    # four classes, each a Gaussian blob in 8-d
    centres = torch.randn(4, 8) * 3
    labels = torch.randint(0, 4, (4, 25))
    x = centres[labels] + torch.randn(4, 25, 8)
    model = DeepMoEClassifier(8, 4, num_layers=2, layer_size=16, num_experts=4,
                              load_balancing_weight=0.01, balance_margin=10.0,
                              balance_epochs=1)
    set_moe_epoch(model, 1)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for _ in range(40):
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 4), labels.reshape(-1))
        total = loss + moe_auxiliary_loss(model)
        optimiser.zero_grad()
        total.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    stats = collect_expert_stats(model)
    assert len(stats) == 2
    for layer_stats in stats.values():
        assert min(layer_stats["usage"]) > 0.05  # the constraint kept every expert in use


def test_ctc_encoder_subsamples_and_exposes_layers_to_taps():
    from sb_crossmodal_kd.nnet.dmoe import DeepMoECTCEncoder
    from sb_crossmodal_kd.nnet.taps import EncoderTaps

    torch.manual_seed(0)
    encoder = DeepMoECTCEncoder(n_mels=20, d_model=16, num_layers=3, num_experts=2, top_k=1)
    lengths = torch.tensor([1.0, 0.5])
    taps = EncoderTaps(encoder, layers=[1, 3])
    out, hidden = taps(torch.randn(2, 81, 20), lengths)
    assert out.shape == (2, 21, 16) and hidden[1].shape == (2, 21, 16)
    torch.testing.assert_close(hidden[3], out)
    real = int(torch.round(lengths * 21).sum())
    assert {s["frames"] for s in collect_expert_stats(encoder).values()} == {float(real)}
