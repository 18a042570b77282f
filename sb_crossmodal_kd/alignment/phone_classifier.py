"""The forced aligner's acoustic model: a frame-level phone classifier over log-Mel frames.

:class:`~sb_crossmodal_kd.alignment.forced.PhoneAligner` trains one on its corpus (with one
output per phone state) and Viterbi-aligns with its scaled log-likelihoods; with one extra
(blank) output it is the CTC phone model of the aligner's first alignment.
"""

import torch


class PhoneClassifier(torch.nn.Module):
    """Frame-level phone classifier: 1-D convolutions over log-Mel frames.

    Arguments
    ---------
    n_mels : int
        Input feature dimension.
    n_phones : int
        Output classes.
    hidden : int
        Channels.
    kernel_size : int
        Convolution width (frames).
    layers : int
        Number of convolution layers.
    dilation_growth : int
        Layer ``i`` has dilation ``dilation_growth ** i``, widening the context at no extra
        cost: the receptive field is ``1 + (kernel_size - 1) * sum(dilations)`` frames. A wide
        context lets the model learn its own labels' positions instead of the acoustics: it
        sees an onset coming and labels the pause before it as the phone, and each
        re-alignment round moves boundaries further (on SynthCommands valid, word starts
        drifted about 3 ms earlier per round with 13 frames of context). The aligner's
        default is one layer of kernel 3 (3 frames, +-10 ms).

    Example
    -------
    >>> model = PhoneClassifier(40, 40)
    >>> model(torch.randn(2, 50, 40)).shape
    torch.Size([2, 50, 40])
    """

    def __init__(self, n_mels, n_phones, hidden=128, kernel_size=5, layers=3, dilation_growth=1):
        super().__init__()
        blocks, channels = [], n_mels
        for i in range(layers):
            dilation = dilation_growth**i
            blocks += [
                torch.nn.Conv1d(
                    channels, hidden, kernel_size, padding=dilation * (kernel_size // 2),
                    dilation=dilation,
                ),
                torch.nn.BatchNorm1d(hidden),
                torch.nn.ReLU(),
            ]
            channels = hidden
        self.convs = torch.nn.Sequential(*blocks)
        self.out = torch.nn.Linear(hidden, n_phones)

    def forward(self, features):
        """``(batch, time, n_mels)`` -> logits ``(batch, time, n_phones)``."""
        hidden = self.convs(features.transpose(1, 2)).transpose(1, 2)
        return self.out(hidden)


def scaled_log_likelihoods(model, features, log_prior, prior_scale):
    """Scaled log-likelihoods ``(T, classes)`` of features ``(T, n_mels)``, on the CPU.

    The model's log posteriors (computed on the model's device) minus ``prior_scale`` times
    the log prior of each class: what the aligner's Viterbi search scores frames with.

    Example
    -------
    >>> model = PhoneClassifier(40, 6).eval()
    >>> scaled_log_likelihoods(model, torch.randn(50, 40), torch.zeros(6), 0.7).shape
    torch.Size([50, 6])
    """
    device = next(model.parameters()).device
    with torch.no_grad():
        log_post = model(features.to(device).unsqueeze(0))[0].log_softmax(-1).cpu()
    return log_post - prior_scale * log_prior
