"""Auxiliary heads: settings, shapes, hparams fragments, and absence from inference models."""

from pathlib import Path

import pytest
import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.utils.checkpoints import Checkpointer

from sb_crossmodal_kd.losses import DistillationObjective
from sb_crossmodal_kd.nnet.heads import AuxiliaryHead, AuxiliaryHeads, inference_modules

FRAGMENTS = Path(__file__).resolve().parents[1] / "hparams"


def test_linear_and_mlp_projections():
    linear = AuxiliaryHead("senone", layer=1, input_size=8, n_units=20)
    mlp = AuxiliaryHead("senone", layer=1, input_size=8, n_units=20, hidden_size=16,
                        dropout=0.1)
    assert [type(m).__name__ for m in linear.projection] == ["Linear"]
    assert [type(m).__name__ for m in mlp.projection] == [
        "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    x = torch.randn(2, 5, 8)
    assert linear(x).shape == mlp(x).shape == (2, 5, 20)


def test_ctc_head_adds_a_blank_after_the_units():
    head = AuxiliaryHead("monophone", layer=2, input_size=8, n_units=40, loss="ctc")
    logits = head(torch.randn(1, 3, 8))
    assert logits.shape[-1] == 41 and head.blank_index == 40
    assert torch.equal(head.unit_logits(logits), logits[..., :40])
    frame = AuxiliaryHead("monophone", layer=2, input_size=8, n_units=40, loss="frame_ce")
    assert frame.blank_index is None and frame(torch.randn(1, 3, 8)).shape[-1] == 40


@pytest.mark.parametrize("kwargs,match", [
    ({"loss": "mse"}, "loss 'mse' is not one of"),
    ({"tau": 0.0}, "tau must be > 0"),
    ({"alpha": -1.0}, "must be >= 0"),
])
def test_bad_head_settings_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AuxiliaryHead("subword", layer=1, input_size=4, n_units=5, **kwargs)


def test_heads_container_routes_each_head_to_its_layer():
    heads = AuxiliaryHeads(
        low=AuxiliaryHead("senone", 1, 4, 7),
        high=AuxiliaryHead("subword", 3, 6, 9),
        dropped=None,
    )
    assert list(heads) == ["low", "high"] and heads.layers == [1, 3]
    hidden = {1: torch.randn(2, 5, 4), 3: torch.randn(2, 5, 6)}
    logits = heads(hidden)
    assert torch.equal(logits["low"], heads["low"](hidden[1]))
    assert torch.equal(logits["high"], heads["high"](hidden[3]))
    with pytest.raises(KeyError, match="reads encoder layer 3, which was not tapped"):
        heads({1: hidden[1]})
    with pytest.raises(TypeError, match="expected an AuxiliaryHead"):
        AuxiliaryHeads(bad=torch.nn.Linear(2, 2))


def _training_modules():
    encoder = torch.nn.Linear(4, 4)
    heads = AuxiliaryHeads(sub=AuxiliaryHead("subword", 1, 4, 6, hidden_size=8))
    return torch.nn.ModuleDict({"encoder": encoder, "ctc_lin": torch.nn.Linear(4, 7),
                                "auxiliary_heads": heads})


def test_heads_absent_from_inference_state_dict():
    modules = _training_modules()
    assert any(k.startswith("auxiliary_heads.") for k in modules.state_dict())
    inference = inference_modules(modules)
    keys = set(inference.state_dict())
    assert keys == {"encoder.weight", "encoder.bias", "ctc_lin.weight", "ctc_lin.bias"}
    assert inference["encoder"] is modules["encoder"]  # same modules, no copies
    # the exported weights load strictly into a model built without heads
    fresh = torch.nn.ModuleDict({"encoder": torch.nn.Linear(4, 4),
                                 "ctc_lin": torch.nn.Linear(4, 7)})
    fresh.load_state_dict(inference.state_dict(), strict=True)
    # plain dicts (hparams["modules"]) work too
    assert set(inference_modules(dict(modules))) == {"encoder", "ctc_lin"}


def test_heads_nested_in_another_module_cannot_be_silently_exported():
    nested = torch.nn.Sequential(torch.nn.Linear(4, 4),
                                 AuxiliaryHeads(a=AuxiliaryHead("subword", 1, 4, 3)))
    with pytest.raises(ValueError, match="contains auxiliary heads"):
        inference_modules({"model": nested})


def test_inference_model_recovers_from_a_training_checkpoint(tmp_path):
    # the training checkpoint stores heads as their own recoverable; an inference model
    # built from the same hparams without heads recovers everything else from it
    train = _training_modules()
    Checkpointer(tmp_path, recoverables=dict(train)).save_checkpoint()
    torch.manual_seed(123)
    serving = inference_modules(_training_modules())
    assert not torch.equal(serving["encoder"].weight, train["encoder"].weight)
    Checkpointer(tmp_path, recoverables=dict(serving)).recover_if_possible()
    assert torch.equal(serving["encoder"].weight, train["encoder"].weight)
    assert torch.equal(serving["ctc_lin"].bias, train["ctc_lin"].bias)


def test_heads_fragment_loads_alone():
    with open(FRAGMENTS / "heads.yaml") as handle:
        hp = load_hyperpyyaml(handle)
    heads = hp["auxiliary_heads"]
    assert list(heads) == ["senone", "monophone", "subword"]
    assert heads.layers == [1, 2, 3]  # senones lowest, subwords nearest the output
    assert heads["monophone"].n_units == 40
    assert heads["senone"] is hp["senone_head"]


def test_recipe_includes_fragments_with_overrides_and_ablation(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
d_model: 32
vocab_size: 50
blank_index: !ref <vocab_size>
heads: !include:{FRAGMENTS / 'heads.yaml'}
    d_model: !ref <d_model>
    n_senones: 90
    n_subwords: !ref <vocab_size>
    subword_loss: ctc
    subword_loss_weight: 0.3
    subword_tau: 2.0
    mlp_hidden: 24
    senone_head: null
kd: !include:{FRAGMENTS / 'kd.yaml'}
    label_interpolation: 0.3
    main_blank_index: !ref <blank_index>
modules:
    auxiliary_heads: !ref <heads[auxiliary_heads]>
distillation: !ref <kd[distillation]>
""")
    with open(recipe) as handle:
        hp = load_hyperpyyaml(handle)
    heads = hp["modules"]["auxiliary_heads"]
    assert list(heads) == ["monophone", "subword"]  # senone level dropped
    sub = heads["subword"]
    assert (sub.n_units, sub.n_outputs, sub.loss, sub.loss_weight, sub.tau) == (
        50, 51, "ctc", 0.3, 2.0)
    assert sub.projection[0].in_features == 32 and sub.projection[0].out_features == 24
    objective = hp["distillation"]
    assert isinstance(objective, DistillationObjective)
    assert objective.label_interpolation == 0.3 and objective.main_blank_index == 50
    assert objective.required_unit_types(heads) == ["monophone", "subword"]


def test_kd_fragment_defaults_are_the_plain_objective():
    with open(FRAGMENTS / "kd.yaml") as handle:
        objective = load_hyperpyyaml(handle)["distillation"]
    assert not objective.uses_label_interpolation
    assert not objective.scale_by_tau_squared and objective.moe_weight == 1.0


def test_ablation_driver_can_drop_a_level_through_overrides(tmp_path):
    # what an ablation driver passes to load_hyperpyyaml / run_asr_experiment
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"d_model: 32\nheads: !include:{FRAGMENTS / 'heads.yaml'}\n"
                      "    d_model: !ref <d_model>\n")
    for overrides, expected in [
        ({}, ["senone", "monophone", "subword"]),
        ({"heads": {"senone_head": None}}, ["monophone", "subword"]),
        ({"heads": {"senone_head": None, "monophone_head": None}}, ["subword"]),
    ]:
        with open(recipe) as handle:
            hp = load_hyperpyyaml(handle, overrides)
        assert list(hp["heads"]["auxiliary_heads"]) == expected
    with open(recipe) as handle:
        hp = load_hyperpyyaml(handle, {"heads": {"subword_layer": 4, "subword_alpha": 0.25}})
    sub = hp["heads"]["auxiliary_heads"]["subword"]
    assert (sub.layer, sub.alpha, sub.projection[0].in_features) == (4, 0.25, 32)
