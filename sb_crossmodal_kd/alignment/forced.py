"""Monophone forced alignment of a real corpus, from a flat start.

No existing aligner or acoustic model is assumed: :class:`PhoneAligner` trains its own small
frame-level phone classifier on the corpus (audio + lexicon phone sequences) the way HMM
systems are bootstrapped, and Viterbi-aligns with it:

1. *Start*: ``init="flat"``: leading and trailing low-energy frames are labelled silence and
   the frames between are split evenly over the utterance's phones; ``init="ctc"``: a CTC
   phone model (same network plus a blank output) is trained on the phone sequences, which
   needs no segmentation, and its blank-free posteriors are Viterbi-aligned.
2. Train the frame classifier (a small 1-D convolutional network over 10 ms log-Mel frames)
   on the current labels for a few epochs.
3. Re-align every utterance: Viterbi (:func:`~sb_crossmodal_kd.alignment.viterbi.viterbi_align`)
   on the classifier's scaled log-likelihoods ``log p(phone | x) - prior_scale * log p(phone)``
   through the known phone sequence, with a minimum duration per phone and an optional
   silence at the edges and between words. Every frame is labelled.
   A silence between words has ``pause_states`` states, by default one: a *short pause*
   (HTK's ``sp``) tied to the silence model's centre state, so that a pause of one frame can
   be aligned. A three-state silence needs 30 ms, and most pauses between words are shorter
   (in SynthCommands, 64 % of them); a pause too short for the model is given to a word.
4. Repeat 2-3 for ``iterations`` rounds.

The alignment is made at the 10 ms feature rate and converted to the encoder rate with
:class:`~sb_crossmodal_kd.alignment.framerate.FrameRate`.

This module holds the aligner's API: its settings, features, alignment and persistence. The
parts live in modules of their own, and their public names are importable from here too:

- :mod:`~sb_crossmodal_kd.alignment.phone_classifier`: the model, :class:`PhoneClassifier`;
- :mod:`~sb_crossmodal_kd.alignment.aligner_training`: steps 1, 2 and 4;
- :mod:`~sb_crossmodal_kd.alignment.phone_states`: a transcript as the model's states;
- :mod:`~sb_crossmodal_kd.alignment.phone_alignment`: step 3 and its result,
  :class:`PhoneAlignment`;
- :mod:`~sb_crossmodal_kd.alignment.word_boundaries`: :func:`boundary_errors`, the
  alignment's word-boundary errors against reference times.

Example
-------
>>> from sb_crossmodal_kd.units.lexicon import Lexicon
>>> lexicon = Lexicon({"hi": [["HH", "AY1"]], "you": [["Y", "UW1"]]})
>>> aligner = PhoneAligner(lexicon, AlignerSettings(iterations=1, epochs=1))
>>> result = aligner.align_features(torch.randn(60, 40), "hi you", "u1")
>>> len(result.feature_positions), [w[0] for w in result.words]
(60, ['hi', 'you'])
"""

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from speechbrain.lobes.features import Fbank

from sb_crossmodal_kd.alignment.aligner_training import train_aligner
from sb_crossmodal_kd.alignment.framerate import FrameRate
from sb_crossmodal_kd.alignment.phone_alignment import (
    PhoneAlignment,
    alignment_from_path,
    state_path,
)
from sb_crossmodal_kd.alignment.phone_classifier import PhoneClassifier, scaled_log_likelihoods
from sb_crossmodal_kd.alignment.phone_states import token_sequence
from sb_crossmodal_kd.alignment.word_boundaries import boundary_errors
from sb_crossmodal_kd.data.audio import load_audio
from sb_crossmodal_kd.units.phones import PHONES

__all__ = [
    "AlignerSettings",
    "PhoneAligner",
    "PhoneAlignment",
    "PhoneClassifier",
    "boundary_errors",
]


@dataclass
class AlignerSettings:
    """Settings of :class:`PhoneAligner` (all recorded with a saved aligner)."""

    n_mels: int = 40
    win_length_ms: float = 15.0
    hidden: int = 128
    kernel_size: int = 3
    layers: int = 1  # +-1 frame of context: see PhoneClassifier
    dilation_growth: int = 1
    init: str = "ctc"
    ctc_epochs: int = 12
    iterations: int = 4
    epochs: int = 2
    learning_rate: float = 2e-3
    chunk_frames: int = 200
    batch_size: int = 32
    # Each batch's gradient is the sum of this many parts' (a fixed split): under torchrun
    # up to this many ranks share the gradient steps, and the weights do not depend on how
    # many do.
    batch_parts: int = 4
    states_per_phone: int = 3
    min_duration: int = 1
    pause_states: int = 1  # states of a pause between words; 1: 10 ms pauses can be aligned
    prior_scale: float = 0.7
    silence_energy: float = 0.25
    seed: int = 0
    frame_rate: FrameRate = field(default_factory=FrameRate)

    def __post_init__(self):
        if isinstance(self.batch_parts, bool) or not isinstance(self.batch_parts, int) \
                or self.batch_parts < 1:
            raise ValueError(f"the aligner's batch_parts must be a whole number of at least 1, "
                             f"not {self.batch_parts!r}")


class PhoneAligner:
    """Trains a frame-level phone model on a corpus from a flat start, and aligns with it.

    Arguments
    ---------
    lexicon : Lexicon
        Words to phones (its OOV policy applies; skipped utterances are logged).
    settings : AlignerSettings
    device : str
        Where the phone model trains and runs (``cpu``, ``cuda``, ``cuda:1``); features are
        made and Viterbi runs on the CPU, and a saved aligner loads on any device.
    """

    def __init__(self, lexicon, settings=None, device="cpu"):
        self.lexicon = lexicon
        self.settings = settings or AlignerSettings()
        self.device = torch.device(device)
        torch.manual_seed(self.settings.seed)
        s = self.settings
        # The aligner's own features: same hop and centring as the model's Fbank, so frame j
        # is centred at j * hop; a shorter window than the model's blurs boundaries less.
        self.fbank = Fbank(
            n_mels=s.n_mels,
            sample_rate=s.frame_rate.sample_rate,
            win_length=s.win_length_ms,
            hop_length=s.frame_rate.hop_length_ms,
        )
        self.n_classes = len(PHONES) * s.states_per_phone
        self.model = PhoneClassifier(
            s.n_mels, self.n_classes, s.hidden, s.kernel_size, s.layers, s.dilation_growth
        ).to(self.device)
        self.log_prior = torch.full((self.n_classes,), -math.log(self.n_classes))
        self.model.eval()

    # ---------------------------------------------------------------- features
    def features(self, waveform):
        """Mean- and variance-normalised log-Mel frames ``(T, n_mels)`` of a 1-D waveform."""
        with torch.no_grad():
            feats = self.fbank(waveform.reshape(1, -1))[0]
        return (feats - feats.mean(0)) / (feats.std(0) + 1e-5)

    # ---------------------------------------------------------------- training
    def train(self, utterances, progress=True, jobs=1):
        """Flat start, then ``iterations`` rounds of (train the phone model, re-align).

        ``utterances`` are ``(utterance_id, waveform or wav path, text)``. On the CPU,
        ``jobs`` ranks of this machine share the training (its gradient steps and
        alignments); under ``torchrun`` every rank calls this, and the ranks share it (with
        ``jobs`` processes each for the alignments). Returns the report of
        :func:`~sb_crossmodal_kd.alignment.aligner_training.train_aligner` (utterances used
        and skipped, frames, losses, seconds).
        """
        return train_aligner(self, utterances, progress, jobs)

    # ---------------------------------------------------------------- alignment
    def log_likelihoods(self, feats):
        """Scaled log-likelihoods ``(T, n_phones * states_per_phone)`` of features ``(T, n_mels)``."""
        return scaled_log_likelihoods(self.model, feats, self.log_prior, self.settings.prior_scale)

    def align_features(self, feats, words, utterance_id):
        """Aligns normalised features ``(T, n_mels)`` (see :meth:`features`) to ``words``."""
        sequence = token_sequence(self.lexicon, words, utterance_id)
        path = state_path(self.log_likelihoods(feats), sequence, self.settings, utterance_id)[0]
        return alignment_from_path(
            path.numpy(), sequence, words, utterance_id, self.settings.frame_rate.feature_shift_s
        )

    def align(self, audio, words, utterance_id):
        """Aligns a waveform (1-D tensor) or wav path to ``words``."""
        return self.align_features(self.features(self.waveform(audio)), words, utterance_id)

    def waveform(self, audio):
        """A waveform as given, or a path's audio at the aligner's rate."""
        if isinstance(audio, str | Path):
            return load_audio(audio, self.settings.frame_rate.sample_rate)
        return audio

    # ---------------------------------------------------------------- persistence
    def state(self):
        """Everything needed to rebuild the aligner (for ``torch.save``)."""
        settings = asdict(self.settings)
        settings["frame_rate"] = asdict(self.settings.frame_rate)
        return {
            "settings": settings,
            "model": {name: value.cpu() for name, value in self.model.state_dict().items()},
            "log_prior": self.log_prior,
            "lexicon": self.lexicon.hash,
        }

    def save(self, path):
        """Saves the trained aligner (atomically)."""
        from sb_crossmodal_kd.io import atomic_path

        # Through a handle: torch names the archive inside after a path's (temporary) name,
        # and the same aligner would not be the same bytes twice.
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            torch.save(self.state(), handle)

    @classmethod
    def load(cls, path, lexicon, device="cpu"):
        """Loads an aligner saved with :meth:`save` onto ``device``; refuses another lexicon."""
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state["lexicon"] != lexicon.hash:
            raise ValueError(
                f"{path}: aligner trained with lexicon {state['lexicon']}, not "
                f"{lexicon.hash}; retrain it with this lexicon"
            )
        settings = dict(state["settings"])
        settings["frame_rate"] = FrameRate(**{
            k: tuple(v) if isinstance(v, list) else v for k, v in settings["frame_rate"].items()
        })
        aligner = cls(lexicon, AlignerSettings(**settings), device)
        aligner.model.load_state_dict(state["model"])
        aligner.log_prior = state["log_prior"]
        return aligner

