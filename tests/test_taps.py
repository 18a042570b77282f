"""Encoder taps return exactly what the encoder's layers computed, for every encoder kind."""

import pytest
import torch
from speechbrain.lobes.models.CRDNN import CRDNN
from speechbrain.lobes.models.transformer.Conformer import ConformerEncoder
from speechbrain.lobes.models.transformer.Transformer import TransformerEncoder
from speechbrain.nnet.attention import RelPosEncXL
from speechbrain.nnet.RNN import GRU

from sb_crossmodal_kd.nnet.taps import EncoderTaps, describe_layers, encoder_layers

D = 16


def _conformer():
    torch.manual_seed(0)
    return ConformerEncoder(num_layers=3, d_model=D, d_ffn=32, nhead=2, kernel_size=3).eval()


def _transformer():
    torch.manual_seed(0)
    return TransformerEncoder(num_layers=3, nhead=2, d_ffn=32, d_model=D).eval()


def _manual_layers(encoder, x, **kwargs):
    """Runs the layer list by hand: outputs of layers 1..L."""
    outputs, out = [], x
    for layer in encoder.layers:
        out, _ = layer(out, **kwargs)
        outputs.append(out)
    return outputs


@pytest.mark.parametrize("make", [_conformer, _transformer])
def test_taps_equal_manually_run_layers(make):
    encoder = make()
    x = torch.randn(2, 9, D)
    padding = torch.tensor([[False] * 9, [False] * 6 + [True] * 3])
    kwargs = {"src_key_padding_mask": padding}
    if isinstance(encoder, ConformerEncoder):  # default RelPosMHAXL needs positions
        kwargs["pos_embs"] = RelPosEncXL(D)(x)
    taps = EncoderTaps(encoder, layers=[1, 2, -1])
    output, hidden = taps(x, **kwargs)
    manual = _manual_layers(encoder, x, **kwargs)
    assert sorted(hidden) == [1, 2, 3]
    for layer in (1, 2, 3):
        assert torch.equal(hidden[layer], manual[layer - 1])
    assert torch.equal(output, encoder.norm(manual[-1]))  # final output is after the norm
    assert torch.equal(output, encoder(x, **kwargs)[0])  # taps change nothing


def test_taps_on_crdnn_blocks():
    torch.manual_seed(0)
    crdnn = CRDNN(input_size=12, cnn_blocks=2, cnn_channels=[4, 6], time_pooling=True,
                  projection_dim=10, rnn_class=GRU, rnn_layers=1, rnn_neurons=8,
                  dnn_blocks=2, dnn_neurons=7, dropout=0.0).eval()
    names = [name for _, name in describe_layers(crdnn)]
    assert names == ["input", "CNN_Block", "CNN_Block", "Sequential", "GRU", "DNN_Block",
                     "DNN_Block"]
    x = torch.randn(2, 8, 12)
    taps = EncoderTaps(crdnn, layers=[0, 2, 4, 6])
    output, hidden = taps(x)
    # by hand, block by block
    cnn1 = crdnn.CNN.block_1(crdnn.CNN.block_0(x))
    pooled = crdnn.time_pooling(cnn1)
    rnn = crdnn.RNN(crdnn.projection(pooled))[0]
    dnn = crdnn.DNN.block_1(crdnn.DNN.block_0(rnn))
    assert hidden[0] is x
    assert torch.equal(hidden[2], cnn1.flatten(start_dim=2))  # [B, T, F, C] -> [B, T, F*C]
    assert hidden[2].shape[1] == 8 and output.shape[1] == 4  # CNN taps are before pooling
    assert torch.equal(hidden[4], rnn)
    assert torch.equal(hidden[6], dnn) and torch.equal(output, dnn)


def test_tapped_tensor_is_the_layer_output_itself_and_keeps_gradients():
    encoder = TransformerEncoder(num_layers=2, nhead=2, d_ffn=8, d_model=4)
    seen = {}

    def spy(module, args, output):
        seen["out"] = output[0]

    encoder.layers[0].register_forward_hook(spy)
    taps = EncoderTaps(encoder, layers=[1])
    _, hidden = taps(torch.randn(1, 3, 4))
    assert hidden[1] is seen["out"]  # a reference, not a copy
    hidden[1].sum().backward()
    assert encoder.layers[0].pos_ffn.ffn[0].weight.grad is not None
    assert encoder.layers[1].pos_ffn.ffn[0].weight.grad is None


def test_capture_inside_a_wrapping_module():
    # e.g. the encoder is run by a larger model (TransformerASR.encode, ConformerCTCEncoder)
    inner = _transformer()
    wrapper = torch.nn.Sequential(torch.nn.Linear(5, D), torch.nn.Identity())
    taps = EncoderTaps(inner, layers=[0, 3])
    x = torch.randn(1, 4, 5)
    with taps.capture() as hidden:
        projected = wrapper(x)
        out, _ = inner(projected)
        assert sorted(hidden) == [0, 3]  # usable inside the block
    assert hidden[0] is projected
    assert torch.equal(hidden[3], _manual_layers(inner, projected)[-1])
    # outside a capture nothing is recorded
    _ = inner(projected)
    assert taps._recording is None


def test_wrapper_with_layers_attribute_taps_the_inner_encoder():
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.front = torch.nn.Linear(3, D)
            self.layers = _transformer()

        def forward(self, x):
            return self.layers(self.front(x))[0]

    model = Wrapper().eval()
    assert len(encoder_layers(model)) == 3
    x = torch.randn(2, 5, 3)
    output, hidden = EncoderTaps(model, layers=[0, 1])(x)
    assert torch.equal(hidden[0], model.front(x))  # layer 0 = input of the layers
    assert torch.equal(hidden[1], _manual_layers(model.layers, model.front(x))[0])


def test_layerdrop_skipped_layer_repeats_the_previous_output():
    torch.manual_seed(0)
    encoder = ConformerEncoder(num_layers=3, d_model=D, d_ffn=32, nhead=2,
                               attention_type="regularMHA", layerdrop_prob=1.0).train()
    x = torch.randn(1, 5, D)
    _, hidden = EncoderTaps(encoder, layers=[1, 3])(x)  # every layer is dropped
    assert hidden[1] is x and hidden[3] is x


def test_bad_settings_are_clear_errors():
    encoder = _transformer()
    with pytest.raises(ValueError, match="out of range.*3 layers"):
        EncoderTaps(encoder, layers=[4])
    with pytest.raises(TypeError, match="Cannot find the layers of a Linear"):
        EncoderTaps(torch.nn.Linear(2, 2), layers=[1])
    taps = EncoderTaps(encoder, layers=[1])
    with taps.capture(), pytest.raises(RuntimeError, match="do not nest"):
        with taps.capture():
            pass


def test_remove_detaches_hooks():
    encoder = _transformer()
    taps = EncoderTaps(encoder, layers=[1, 2])
    taps.remove()
    assert not encoder.layers[0]._forward_hooks and not encoder._forward_pre_hooks


def test_taps_on_the_deep_moe_stack_are_its_finished_layer_outputs():
    from sb_crossmodal_kd.nnet.dmoe import DeepMoE

    torch.manual_seed(0)
    stack = DeepMoE(6, num_layers=3, layer_size=8, num_experts=2, residual=True,
                    layer_norm=True).eval()
    x = torch.randn(2, 5, 6)
    lengths = torch.tensor([1.0, 0.6])
    expected_out, expected_layers = stack(x, lengths=lengths)
    assert [type(m).__name__ for m in encoder_layers(stack)] == ["MoE"] * 3
    output, hidden = EncoderTaps(stack, layers=[0, 1, -1])(x, lengths=lengths)
    assert hidden[0] is x and torch.equal(output, expected_out)
    assert torch.equal(hidden[1], expected_layers[0])  # after residual + norm + padding mask
    assert torch.equal(hidden[3], expected_layers[2])
    hidden[1].sum().backward()
    assert all(p.grad is not None for p in stack.layers[0].parameters())
    assert all(p.grad is None for p in stack.layers[2].parameters())


def test_taps_on_the_recipe_conformer_encoder():
    from sb_crossmodal_kd.nnet.conformer import ConformerCTCEncoder

    torch.manual_seed(0)
    encoder = ConformerCTCEncoder(n_mels=20, d_model=D, num_layers=3, nhead=2, d_ffn=32,
                                  kernel_size=3, front_channels=(4, 4)).eval()
    feats, lengths = torch.randn(2, 41, 20), torch.tensor([1.0, 0.7])
    output, hidden = EncoderTaps(encoder, layers=[0, 2])(feats, lengths)
    x = encoder.front_end(feats)
    assert hidden[0].shape == x.shape == (2, 11, D)  # layer 0: after the front end
    assert torch.equal(hidden[0], x)
    padding = torch.arange(11)[None, :] >= torch.round(lengths * 11)[:, None]
    manual = _manual_layers(encoder.layers, x, src_key_padding_mask=padding,
                            pos_embs=encoder.positional(x))
    assert torch.equal(hidden[2], manual[1])
    assert torch.equal(output, encoder(feats, lengths))
