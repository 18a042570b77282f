"""Frame-rate lengths match what SpeechBrain's Fbank + ConvolutionFrontEnd really output."""

import numpy as np
import pytest
import torch
from speechbrain.lobes.features import Fbank
from speechbrain.lobes.models.convolution import ConvolutionFrontEnd

from sb_crossmodal_kd.alignment.framerate import AlignmentLengthError, FrameRate, fit_to_length


@pytest.mark.parametrize("layers_per_block", [1, 3])
def test_encoder_lengths_match_real_front_end(layers_per_block):
    torch.manual_seed(0)
    fbank = Fbank(n_mels=80)
    front_end = ConvolutionFrontEnd(
        input_shape=(1, None, 80),
        num_blocks=2,
        num_layers_per_block=layers_per_block,
        out_channels=[4, 4],
        kernel_sizes=[3, 3],
        strides=[2, 2],
        residuals=[False, False],
    ).eval()
    rate = FrameRate()
    # Odd lengths around hop and subsampling boundaries, plus ordinary utterance lengths.
    for n_samples in [800, 1599, 1600, 1601, 2239, 2240, 4321, 16000, 16159, 16160, 33333]:
        wav = torch.randn(1, n_samples)
        with torch.no_grad():
            feats = fbank(wav)
            out = front_end(feats)
        assert feats.shape[1] == rate.feature_frames(n_samples), n_samples
        assert out.shape[1] == rate.encoder_frames(feats.shape[1]), n_samples
        assert out.shape[1] == rate.frames_for_samples(n_samples), n_samples


def test_tensor_lengths_vectorise():
    rate = FrameRate()
    n = torch.tensor([1600, 16000, 33333])
    expected = [rate.frames_for_samples(int(v)) for v in n]
    assert rate.frames_for_samples(n).tolist() == expected


def test_segments_centre_rule_and_downsample_modes():
    rate = FrameRate()
    # 10 ms labels: 0 for 30 ms, 1 for 50 ms, 2 for 20 ms.
    feat = np.array([0, 0, 0, 1, 1, 1, 1, 1, 2, 2])
    # Encoder frames are centred on feature frames 0, 4, 8.
    assert rate.downsample(feat, mode="centre").tolist() == [0, 1, 2]
    # Majority windows [-2, 2), [2, 6), [6, 10): {0,0}, {0,1,1,1}, {1,1,2,2} (tie -> centre 2).
    assert rate.downsample(feat, mode="majority").tolist() == [0, 1, 2]
    feat2 = np.array([5, 5, 5, 5, 5, 7, 7, 7, 5])
    # Window of frame 1 is feature frames 2..5 = {5,5,5,7}: majority 5 although centre is 5.
    assert rate.downsample(feat2, mode="majority").tolist()[1] == 5
    feat3 = np.array([5, 5, 7, 7, 8, 7, 9, 9, 9])
    # Frame 1: window {7,7,8,7}, centre label 8 loses to 7 under majority.
    assert rate.downsample(feat3, mode="majority")[1] == 7
    assert rate.downsample(feat3, mode="centre")[1] == 8
    segs = [(3, 0.0, 0.1), (4, 0.1, 0.15)]
    assert rate.segments_to_frames(segs, 5).tolist() == [3, 3, 3, 4, -1]


def test_fit_to_length_refuses_beyond_tolerance_naming_utterance():
    assert fit_to_length(np.arange(5), 4, tolerance=2, utterance_id="a").tolist() == [0, 1, 2, 3]
    with pytest.raises(AlignmentLengthError, match="'spk1-utt7'.*longer by 5"):
        fit_to_length(np.arange(10), 5, tolerance=2, utterance_id="spk1-utt7")
    with pytest.raises(AlignmentLengthError, match="'spk1-utt8'.*shorter by 5"):
        fit_to_length(np.arange(5), 10, tolerance=2, utterance_id="spk1-utt8")
