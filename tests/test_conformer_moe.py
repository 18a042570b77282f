"""MoE FFNs swapped into SpeechBrain's Conformer and Transformer encoders."""

from pathlib import Path

import pytest
import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.lobes.models.transformer.Conformer import ConformerEncoder
from speechbrain.lobes.models.transformer.Transformer import TransformerEncoder

from sb_crossmodal_kd.nnet.conformer_moe import use_moe_ffn
from sb_crossmodal_kd.nnet.moe import (
    MoE,
    collect_expert_stats,
    moe_auxiliary_loss,
    moe_layers,
    set_padding_mask,
)


def conformer(num_layers=2, **kwargs):
    return ConformerEncoder(num_layers=num_layers, d_model=16, d_ffn=32, nhead=2, kernel_size=3,
                            attention_type="regularMHA", **kwargs)


def test_swaps_every_kth_layer_and_chosen_macaron_halves():
    names = [n for n, _ in moe_layers(use_moe_ffn(conformer(4), num_experts=2, every=2))]
    assert names == ["layers.1.ffn_module1.1", "layers.1.ffn_module2.1",
                     "layers.3.ffn_module1.1", "layers.3.ffn_module2.1"]
    names = [n for n, _ in moe_layers(
        use_moe_ffn(conformer(3), num_experts=2, layers=[0, 2], conformer_ffn="second"))]
    assert names == ["layers.0.ffn_module2.1", "layers.2.ffn_module2.1"]
    transformer = TransformerEncoder(num_layers=3, nhead=2, d_ffn=32, d_model=16)
    names = [n for n, _ in moe_layers(use_moe_ffn(transformer, num_experts=4, top_k=1))]
    assert names == [f"layers.{i}.pos_ffn" for i in range(3)]


def test_upcycled_encoder_computes_what_the_dense_one_did():
    torch.manual_seed(0)
    encoder = conformer(2).eval()
    x = torch.randn(2, 9, 16)
    dense_out, _ = encoder(x)
    use_moe_ffn(encoder, num_experts=4, top_k=2)
    moe_out, _ = encoder(x)
    torch.testing.assert_close(moe_out, dense_out, rtol=1e-4, atol=1e-5)


# The 2-layer Conformer of conformer() with MoE FFNs in its second layer, as hparams build it;
# each test adds use_moe_ffn settings (indented by four spaces) and entries of its own.
CONFORMER_HPARAMS = """    encoder: !new:speechbrain.lobes.models.transformer.Conformer.ConformerEncoder
        num_layers: 2
        d_model: 16
        d_ffn: 32
        nhead: 2
        kernel_size: 3
        attention_type: regularMHA
"""
MOE_ENCODER_HPARAMS = f"""
encoder: !apply:sb_crossmodal_kd.nnet.conformer_moe.use_moe_ffn
{CONFORMER_HPARAMS}    num_experts: 4
    every: 2
"""

UPCYCLED_HPARAMS = MOE_ENCODER_HPARAMS + """    top_k: 2
    init_from_dense: False
pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    collect_in: {collect}
    loadables:
        encoder: !ref <encoder>
    paths:
        encoder: {checkpoint}
"""


def test_speechbrain_pretrainer_upcycles_a_dense_checkpoint_into_the_moe_encoder(tmp_path):
    # A user's pretrained dense Conformer, saved as SpeechBrain saves modules.
    torch.manual_seed(0)
    dense = conformer(2).eval()
    checkpoint = tmp_path / "dense" / "encoder.ckpt"
    checkpoint.parent.mkdir()
    torch.save(dense.state_dict(), checkpoint)
    hparams = load_hyperpyyaml(UPCYCLED_HPARAMS.format(collect=tmp_path / "collected",
                                                       checkpoint=checkpoint))
    encoder = hparams["encoder"].eval()
    x = torch.randn(2, 9, 16)
    assert not torch.allclose(encoder(x)[0], dense(x)[0], atol=1e-3)  # experts not yet loaded
    hparams["pretrainer"].collect_files()
    hparams["pretrainer"].load_collected()
    assert [n for n, _ in moe_layers(encoder)] == ["layers.1.ffn_module1.1",
                                                   "layers.1.ffn_module2.1"]
    torch.testing.assert_close(encoder(x)[0], dense(x)[0], rtol=1e-4, atol=1e-5)
    # The upcycled model's own checkpoint loads strictly into a fresh MoE encoder.
    fresh = use_moe_ffn(conformer(2), num_experts=4, top_k=2, every=2, init_from_dense=False)
    fresh.load_state_dict(encoder.state_dict())
    torch.testing.assert_close(fresh.eval()(x)[0], dense(x)[0], rtol=1e-4, atol=1e-5)


def test_a_dense_checkpoint_of_other_sizes_is_refused_naming_the_parameter():
    moe_encoder = use_moe_ffn(conformer(2), num_experts=2, init_from_dense=False)
    other = ConformerEncoder(num_layers=2, d_model=16, d_ffn=48, nhead=2, kernel_size=3,
                             attention_type="regularMHA")
    with pytest.raises(RuntimeError, match=r"layers\.0\.ffn_module1\.1\.experts\.w_in"):
        moe_encoder.load_state_dict(other.state_dict())


def test_conformer_with_moe_ffns_trains_on_a_tiny_batch_with_padding():
    torch.manual_seed(0)
    encoder = use_moe_ffn(conformer(2), num_experts=4, top_k=2, init_from_dense=False,
                          load_balancing_weight=0.01, z_loss_weight=1e-3)
    head = torch.nn.Linear(16, 5)
    x = torch.randn(3, 12, 16)
    lengths = torch.tensor([1.0, 0.75, 0.5])
    valid = torch.arange(12) < torch.round(lengths * 12).unsqueeze(1)
    labels = torch.randint(0, 5, (3, 12))
    pad = ~valid
    params = list(encoder.parameters()) + list(head.parameters())
    optimiser = torch.optim.Adam(params, lr=3e-3)
    losses = []
    for _ in range(30):
        out, _ = encoder(x, src_key_padding_mask=pad)  # the swap's hook passes pad to MoEs
        logits = head(out)[valid]
        loss = torch.nn.functional.cross_entropy(logits, labels[valid])
        aux = moe_auxiliary_loss(encoder)
        assert aux.requires_grad
        optimiser.zero_grad()
        (loss + aux).backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    stats = collect_expert_stats(encoder)
    assert len(stats) == 4
    # padding frames never reach the MoE statistics
    assert {s["frames"] for s in stats.values()} == {30.0 * int(valid.sum())}
    assert all(m.experts.w_in.grad is not None for _, m in moe_layers(encoder))
    assert all(m.padding_context is None for _, m in moe_layers(encoder))  # not left stale


def test_padding_from_set_padding_mask_when_the_encoder_gets_no_mask():
    torch.manual_seed(0)
    encoder = use_moe_ffn(conformer(1), num_experts=2, top_k=1)
    x = torch.randn(2, 6, 16)
    set_padding_mask(encoder, lengths=torch.tensor([1.0, 0.5]))
    encoder(x)
    assert {s["frames"] for s in collect_expert_stats(encoder).values()} == {9.0}


def test_usable_from_hparams_with_apply():
    hparams = load_hyperpyyaml(MOE_ENCODER_HPARAMS + """    top_k: 1
    capacity_factor: 1.5
""")
    layers = moe_layers(hparams["encoder"])
    assert len(layers) == 2 and all(isinstance(m, MoE) for _, m in layers)
    assert layers[0][1].capacity_factor == 1.5 and layers[0][1].top_k == 1


def test_bad_settings_name_the_setting():
    with pytest.raises(ValueError, match="every"):
        use_moe_ffn(conformer(2), every=0)
    with pytest.raises(ValueError, match="layers="):
        use_moe_ffn(conformer(2), layers=[5])
    with pytest.raises(ValueError, match="conformer_ffn"):
        use_moe_ffn(conformer(2), conformer_ffn="middle")
    with pytest.raises(ValueError, match="top_k"):
        use_moe_ffn(conformer(2), num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="no SpeechBrain"):
        use_moe_ffn(torch.nn.Linear(3, 3))


def test_project_conformer_ctc_encoder_routes_only_real_frames():
    from sb_crossmodal_kd.nnet.conformer import ConformerCTCEncoder

    torch.manual_seed(0)
    encoder = use_moe_ffn(
        ConformerCTCEncoder(n_mels=20, d_model=16, num_layers=2, nhead=2, d_ffn=32),
        num_experts=4, top_k=2,
    )
    lengths = torch.tensor([1.0, 0.5])
    out = encoder(torch.randn(2, 41, 20), lengths)  # 41 frames -> 11 after 4x subsampling
    real = int(torch.round(lengths * out.shape[1]).sum())
    stats = collect_expert_stats(encoder)
    assert len(stats) == 4 and {s["frames"] for s in stats.values()} == {float(real)}


def test_shared_moe_fragment_configures_an_encoder(tmp_path):
    root = Path(__file__).resolve().parents[1]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
moe: !include:{root / "hparams" / "moe.yaml"}
    num_experts: 4
encoder: !apply:sb_crossmodal_kd.nnet.conformer_moe.use_moe_ffn_settings
{CONFORMER_HPARAMS}    settings: !ref <moe[ffn]>
""")
    with open(recipe) as handle:
        hparams = load_hyperpyyaml(handle)
    layers = moe_layers(hparams["encoder"])
    assert [name for name, _ in layers] == ["layers.1.ffn_module1.1", "layers.1.ffn_module2.1"]
    assert all(m.num_experts == 4 and m.top_k == 2 for _, m in layers)
    assert layers[0][1].load_balancing_weight == 0.01


def test_moe_layers_lists_what_named_modules_does_without_the_wrappers_level():
    # The walk skips leaves and the layers' insides; it must still find every layer once,
    # under its first name, in module order, whatever wraps the model.
    encoder = use_moe_ffn(ConformerEncoder(num_layers=3, d_model=16, d_ffn=32, nhead=2,
                                           kernel_size=3, attention_type="regularMHA"),
                          num_experts=4, top_k=2, every=2)
    shared = MoE(16, num_experts=2)
    model = torch.nn.ModuleDict({"enc": encoder, "a": shared, "b": torch.nn.Sequential(shared)})
    expected = [(name, module) for name, module in model.named_modules()
                if isinstance(module, MoE)]
    assert [name for name, _ in expected] == [
        "enc.layers.1.ffn_module1.1", "enc.layers.1.ffn_module2.1", "a"]
    for wrapped in (model, torch.nn.DataParallel(model), torch.compile(model)):
        found = moe_layers(wrapped)
        assert [name for name, _ in found] == [name for name, _ in expected]
        assert all(a is b for (_, a), (_, b) in zip(found, expected, strict=True))
