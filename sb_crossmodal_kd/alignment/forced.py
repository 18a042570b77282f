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

Example
-------
>>> from sb_crossmodal_kd.units.lexicon import Lexicon
>>> lexicon = Lexicon({"hi": [["HH", "AY1"]], "you": [["Y", "UW1"]]})
>>> aligner = PhoneAligner(lexicon, AlignerSettings(iterations=1, epochs=1))
>>> result = aligner.align_features(torch.randn(60, 40), "hi you", "u1")
>>> len(result.feature_positions), [w[0] for w in result.words]
(60, ['hi', 'you'])
"""

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from speechbrain.lobes.features import Fbank
from tqdm import tqdm

from sb_crossmodal_kd.alignment.framerate import FrameRate
from sb_crossmodal_kd.alignment.phone_alignment import (
    PhoneAlignment,
    alignment_from_path,
    state_path,
)
from sb_crossmodal_kd.alignment.phone_classifier import PhoneClassifier
from sb_crossmodal_kd.alignment.phone_states import state_labels, state_tokens, token_sequence
from sb_crossmodal_kd.alignment.viterbi import viterbi_align
from sb_crossmodal_kd.alignment.word_boundaries import boundary_errors
from sb_crossmodal_kd.data.audio import load_audio
from sb_crossmodal_kd.units.phones import PHONES

# PhoneAlignment, PhoneClassifier and boundary_errors live in modules of their own;
# importable from here too.
__all__ = [
    "AlignerSettings",
    "PhoneAligner",
    "PhoneAlignment",
    "PhoneClassifier",
    "boundary_errors",
]

logger = logging.getLogger(__name__)


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
    states_per_phone: int = 3
    min_duration: int = 1
    pause_states: int = 1  # states of a pause between words; 1: 10 ms pauses can be aligned
    prior_scale: float = 0.7
    silence_energy: float = 0.25
    seed: int = 0
    frame_rate: FrameRate = field(default_factory=FrameRate)


class PhoneAligner:
    """Trains a frame-level phone model on a corpus from a flat start, and aligns with it.

    Arguments
    ---------
    lexicon : Lexicon
        Words to phones (its OOV policy applies; skipped utterances are logged).
    settings : AlignerSettings
    """

    def __init__(self, lexicon, settings=None):
        self.lexicon = lexicon
        self.settings = settings or AlignerSettings()
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
        )
        self.log_prior = torch.full((self.n_classes,), -math.log(self.n_classes))
        self.model.eval()

    # ---------------------------------------------------------------- features
    def features(self, waveform):
        """Mean- and variance-normalised log-Mel frames ``(T, n_mels)`` of a 1-D waveform."""
        with torch.no_grad():
            feats = self.fbank(waveform.reshape(1, -1))[0]
        return (feats - feats.mean(0)) / (feats.std(0) + 1e-5)

    # ---------------------------------------------------------------- flat start
    def _flat_start(self, feats, tokens, optional):
        """Energy-based edge silences and an even split of the rest over the phones."""
        energy = feats.mean(1)
        lo, hi = float(energy.min()), float(energy.max())
        speech = torch.nonzero(energy > lo + self.settings.silence_energy * (hi - lo)).flatten()
        n = feats.shape[0]
        start, end = (int(speech[0]), int(speech[-1]) + 1) if len(speech) else (0, n)
        phones = [k for k, opt in enumerate(optional) if not opt]
        if end - start < len(phones):
            start, end = 0, n
        positions = np.zeros(n, dtype=np.int64)  # token 0 is the leading silence
        positions[end:] = len(tokens) - 1  # the trailing silence
        bounds = np.linspace(start, end, len(phones) + 1).round().astype(int)
        for k, a, b in zip(phones, bounds[:-1], bounds[1:], strict=True):
            positions[a:b] = k
        return state_labels(positions, self._state_tokens(tokens))

    @staticmethod
    def _ctc_targets(tokens, optional):
        """CTC targets: the phones and the edge silences (optional pauses between words left out).

        Example
        -------
        >>> PhoneAligner._ctc_targets([0, 5, 0, 7, 0], [True, False, True, False, True])
        [0, 5, 7, 0]
        """
        last = len(tokens) - 1
        return [
            t for k, (t, opt) in enumerate(zip(tokens, optional, strict=True))
            if not opt or k in (0, last)
        ]

    def _state_tokens(self, tokens):
        """:func:`state_tokens` of ``tokens`` with the aligner's state counts."""
        return state_tokens(tokens, self.settings.states_per_phone, self.settings.pause_states)

    def _ctc_start(self, items, progress):
        """First alignment from a CTC phone model: no initial segmentation needed.

        The phone model gets one extra (blank) output and is trained with CTC on the phone
        sequences framed by silence (recordings start and end in silence; without these
        targets the silence output stays untrained and the first phones spill into the
        leading pause); its blank-free, renormalised posteriors are then Viterbi-aligned. The
        blank output is dropped afterwards and frame-level training continues from these
        weights.
        """
        s = self.settings
        blank = len(PHONES)
        ctc_model = PhoneClassifier(
            s.n_mels, len(PHONES) + 1, s.hidden, s.kernel_size, s.layers, s.dilation_growth
        )
        optimiser = torch.optim.Adam(ctc_model.parameters(), lr=s.learning_rate)
        gen = torch.Generator().manual_seed(s.seed)
        # Batches of similar length keep padding small.
        order = sorted(range(len(items)), key=lambda i: items[i][1].shape[0])
        size = max(1, s.batch_size // 4)
        batches = [order[i : i + size] for i in range(0, len(order), size)]
        ctc_model.train()
        for _ in tqdm(range(s.ctc_epochs), desc="CTC phone model", disable=not progress, leave=False):
            for b in torch.randperm(len(batches), generator=gen).tolist():
                feats = [items[i][1] for i in batches[b]]
                targets = [torch.tensor(self._ctc_targets(items[i][2].tokens, items[i][2].optional))
                           for i in batches[b]]
                x = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
                log_probs = ctc_model(x).log_softmax(-1).transpose(0, 1)
                loss = torch.nn.functional.ctc_loss(
                    log_probs,
                    torch.cat(targets),
                    torch.tensor([f.shape[0] for f in feats]),
                    torch.tensor([len(t) for t in targets]),
                    blank=blank,
                    zero_infinity=True,
                )
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        ctc_model.eval()
        # Frame-level training continues from the CTC network's convolutions.
        self.model.convs.load_state_dict(ctc_model.convs.state_dict())
        labels = []
        for utt_id, feats, seq in items:
            with torch.no_grad():
                log_post = ctc_model(feats.unsqueeze(0))[0][:, :blank].log_softmax(-1)
            token_states = self._state_tokens(seq.tokens)
            # Room for every state of each token, as the state-level re-alignment needs.
            min_frames = [s.min_duration * len(classes) for classes in token_states]
            path = viterbi_align(log_post, seq.tokens, min_frames, seq.optional, utt_id)
            labels.append(state_labels(path.numpy(), token_states))
        return labels

    # ---------------------------------------------------------------- training
    def _train_epochs(self, feats_list, labels_list, epochs, progress):
        s = self.settings
        feats = torch.cat(feats_list)
        labels = torch.as_tensor(np.concatenate(labels_list))
        counts = torch.bincount(labels, minlength=self.n_classes).float() + 1.0
        self.log_prior = (counts / counts.sum()).log()
        n_chunks = max(1, feats.shape[0] // s.chunk_frames)
        feats = feats[: n_chunks * s.chunk_frames].reshape(n_chunks, s.chunk_frames, -1)
        labels = labels[: n_chunks * s.chunk_frames].reshape(n_chunks, s.chunk_frames)
        optimiser = torch.optim.Adam(self.model.parameters(), lr=s.learning_rate)
        gen = torch.Generator().manual_seed(s.seed)
        self.model.train()
        loss = torch.tensor(0.0)
        for _ in tqdm(range(epochs), desc="phone model epochs", disable=not progress, leave=False):
            order = torch.randperm(n_chunks, generator=gen)
            for i in range(0, n_chunks, s.batch_size):
                idx = order[i : i + s.batch_size]
                logits = self.model(feats[idx])
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), labels[idx].reshape(-1)
                )
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        self.model.eval()
        return float(loss.detach())

    def train(self, utterances, progress=True):
        """Flat start, then ``iterations`` rounds of (train the phone model, re-align).

        Arguments
        ---------
        utterances : list of (utterance_id, waveform or wav path, text)
        progress : bool
            Show progress bars.

        Returns
        -------
        dict
            ``{"utterances": n used, "skipped": [(id, reason)], "frames": ...,
            "losses": [...], "seconds": ...}``.
        """
        start_time = time.time()
        items, skipped = [], []
        for utt_id, audio, text in tqdm(utterances, desc="features", disable=not progress):
            try:
                seq = token_sequence(self.lexicon, text, utt_id)
            except KeyError as error:
                skipped.append((utt_id, str(error)))
                logger.warning("Skipping utterance %s: %s", utt_id, error)
                continue
            wav = self.waveform(audio)
            feats = self.features(wav)
            needed = self.settings.min_duration * self.settings.states_per_phone * len(seq.phones)
            if feats.shape[0] < needed:
                skipped.append((utt_id, "too short for its phone sequence"))
                continue
            items.append((utt_id, feats, seq))
        if not items:
            raise ValueError("PhoneAligner.train: no usable utterances")
        feats_list = [f for _, f, _ in items]
        if self.settings.init == "ctc":
            labels_list = self._ctc_start(items, progress)
        elif self.settings.init == "flat":
            labels_list = [self._flat_start(f, seq.tokens, seq.optional) for _, f, seq in items]
        else:
            raise ValueError(f"AlignerSettings.init must be 'flat' or 'ctc', not {self.settings.init!r}")
        losses = []
        for it in range(self.settings.iterations):
            losses.append(self._train_epochs(feats_list, labels_list, self.settings.epochs, progress))
            realigned = []
            for utt_id, feats, seq in tqdm(
                items,
                desc=f"realign {it + 1}/{self.settings.iterations}",
                disable=not progress,
            ):
                positions, substates = state_path(
                    self.log_likelihoods(feats), seq, self.settings, utt_id
                )
                realigned.append(state_labels(
                    positions.numpy(), self._state_tokens(seq.tokens), substates.numpy()
                ))
            labels_list = realigned
        return {
            "utterances": len(items),
            "skipped": skipped,
            "frames": int(sum(f.shape[0] for f in feats_list)),
            "losses": losses,
            "seconds": time.time() - start_time,
        }

    # ---------------------------------------------------------------- alignment
    def log_likelihoods(self, feats):
        """Scaled log-likelihoods ``(T, n_phones * states_per_phone)`` of features ``(T, n_mels)``."""
        with torch.no_grad():
            log_post = self.model(feats.unsqueeze(0))[0].log_softmax(-1)
        return log_post - self.settings.prior_scale * self.log_prior

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
            "model": self.model.state_dict(),
            "log_prior": self.log_prior,
            "lexicon": self.lexicon.hash,
        }

    def save(self, path):
        """Saves the trained aligner (atomically)."""
        from sb_crossmodal_kd.io import atomic_path

        with atomic_path(path) as tmp:
            torch.save(self.state(), tmp)

    @classmethod
    def load(cls, path, lexicon):
        """Loads an aligner saved with :meth:`save`; refuses another lexicon."""
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
        aligner = cls(lexicon, AlignerSettings(**settings))
        aligner.model.load_state_dict(state["model"])
        aligner.log_prior = state["log_prior"]
        return aligner
