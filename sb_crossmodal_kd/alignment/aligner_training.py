"""Training the forced aligner's phone model on a corpus, from no segmentation at all.

:func:`train_aligner` bootstraps the model the way HMM systems are: a first alignment
(:func:`flat_start_labels`: energy-based edge silences and an even split of the rest;
or :func:`ctc_start_labels`: a CTC phone model, which needs no segmentation), then rounds
of frame-level training (:func:`train_frame_classifier`) and Viterbi re-alignment with the
model just trained. It trains a :class:`~sb_crossmodal_kd.alignment.forced.PhoneAligner` in
place (its ``model`` and ``log_prior``); ``PhoneAligner.train`` calls it.

Example
-------
>>> import torch
>>> from sb_crossmodal_kd.alignment.forced import AlignerSettings, PhoneAligner
>>> from sb_crossmodal_kd.units.lexicon import Lexicon
>>> lexicon = Lexicon({"hi": [["HH", "AY1"]], "you": [["Y", "UW1"]]})
>>> settings = AlignerSettings(iterations=1, epochs=1, ctc_epochs=1, chunk_frames=20)
>>> aligner = PhoneAligner(lexicon, settings)
>>> utterances = [("u1", torch.randn(8000), "hi you"), ("u2", torch.randn(400), "you hi")]
>>> report = train_aligner(aligner, utterances, progress=False)
>>> report["utterances"], report["skipped"], len(report["losses"])
(1, [('u2', 'too short for its phone sequence')], 1)
>>> report["audio_seconds"], sorted(report["phase_seconds"])
(0.5, ['features', 'frame_training', 'realign', 'start'])
"""

import copy
import logging
import time

import numpy as np
import torch
from tqdm import tqdm

from sb_crossmodal_kd.alignment.batch_parts import part_ranges, shared_step
from sb_crossmodal_kd.alignment.phone_alignment import state_path
from sb_crossmodal_kd.alignment.phone_classifier import PhoneClassifier, scaled_log_likelihoods
from sb_crossmodal_kd.alignment.phone_states import state_labels, state_tokens, token_sequence
from sb_crossmodal_kd.alignment.viterbi import viterbi_align
from sb_crossmodal_kd.distributed import is_distributed, rank, run_on_local_ranks
from sb_crossmodal_kd.sharding import check_jobs, shard_ranges, shard_results
from sb_crossmodal_kd.units.phones import PHONES

logger = logging.getLogger(__name__)

# Utterances per alignment shard: small enough that a few processes share a few hundred.
REALIGN_SHARD = 50


def train_aligner(aligner, utterances, progress=True, jobs=1, shard_size=REALIGN_SHARD):
    """Flat start, then ``iterations`` rounds of (train the phone model, re-align).

    The gradient steps (the first alignment's CTC model, then each round's frame training)
    run on every rank under ``torchrun``: each batch is split into ``batch_parts`` fixed
    parts whose gradients the ranks compute in turn and gather, and every rank sums them in
    part order and takes the same step
    (:func:`~sb_crossmodal_kd.alignment.batch_parts.shared_step`). The alignments (the CTC
    model's, then each round's re-alignment: a Viterbi search per utterance) are cut into
    shards of ``shard_size`` utterances that ``jobs`` processes and the ranks share
    (:func:`~sb_crossmodal_kd.sharding.shard_results`) with the model on the CPU. So the
    model is the same on every rank and in every process, and the result is the same, byte
    for byte, however many run it (with the same torch threads per process, on the same
    kind of device). Under ``torchrun`` every rank calls this.

    Outside ``torchrun``, ``jobs > 1`` on the CPU trains on ranks of this machine
    (:func:`~sb_crossmodal_kd.distributed.run_on_local_ranks`), one torch thread each, which
    share the gradient steps as ``torchrun``'s do (two ranks trained it 1.6 times as fast as
    one process, two threads 1.35 times, on two cores). There are ``min(jobs, batch_parts)``
    of them (a rank more would have no part to compute, and each holds the corpus's
    features), each aligning its shards in ``jobs // ranks`` processes. On a GPU one process
    trains, and the alignments go to ``jobs`` processes.

    Arguments
    ---------
    aligner : PhoneAligner
        Trained in place (on every rank).
    utterances : list of (utterance_id, waveform or wav path, text)
    progress : bool
        Show progress bars.
    jobs : int
        Processes: ranks of this machine on the CPU (above); under ``torchrun``, or on a
        GPU, processes per rank for the alignments.
    shard_size : int
        Utterances per alignment shard: a finer cut shares a small corpus better; the
        result does not depend on it.

    Returns
    -------
    dict
        ``{"utterances": n used, "skipped": [(id, reason)], "frames": ...,
        "audio_seconds": ..., "losses": [...], "seconds": ..., "phase_seconds": {...}}``,
        the phases being ``features`` (reading and features), ``start`` (the first
        alignment), ``frame_training`` and ``realign`` (summed over the iterations): where
        the time goes, e.g. to plan what to run on a GPU.
    """
    check_jobs(jobs)
    ranks = min(jobs, aligner.settings.batch_parts)
    if ranks > 1 and aligner.device.type == "cpu" and not is_distributed():
        start_time = time.time()
        model, log_prior, report = run_on_local_ranks(
            _train_on_rank, (aligner, utterances, progress, jobs // ranks, shard_size),
            processes=ranks,
        )
        aligner.model.load_state_dict(model)
        aligner.log_prior = log_prior
        return {**report, "seconds": time.time() - start_time}  # the ranks' start included
    settings = aligner.settings
    start_time = time.time()
    phases = dict.fromkeys(("features", "start", "frame_training", "realign"), 0.0)
    clock = time.perf_counter()

    def lap(phase):
        nonlocal clock
        now = time.perf_counter()
        phases[phase] += now - clock
        clock = now

    items, skipped, samples = [], [], 0
    for utt_id, audio, text in tqdm(utterances, desc="features", disable=not progress):
        try:
            seq = token_sequence(aligner.lexicon, text, utt_id)
        except KeyError as error:
            skipped.append((utt_id, str(error)))
            logger.warning("Skipping utterance %s: %s", utt_id, error)
            continue
        wav = aligner.waveform(audio)
        feats = aligner.features(wav)
        needed = settings.min_duration * settings.states_per_phone * len(seq.phones)
        if feats.shape[0] < needed:
            skipped.append((utt_id, "too short for its phone sequence"))
            continue
        items.append((utt_id, feats, seq))
        samples += wav.shape[-1]
    if not items:
        raise ValueError("PhoneAligner.train: no usable utterances")
    feats_list = [f for _, f, _ in items]
    lap("features")
    if settings.init == "ctc":
        labels_list = ctc_start_labels(aligner, items, progress, jobs, shard_size)
    elif settings.init == "flat":
        labels_list = [flat_start_labels(f, seq, settings) for _, f, seq in items]
    else:
        raise ValueError(f"AlignerSettings.init must be 'flat' or 'ctc', not {settings.init!r}")
    lap("start")
    losses = []
    for it in range(settings.iterations):
        losses.append(train_frame_classifier(aligner, feats_list, labels_list, settings.epochs,
                                             progress))
        lap("frame_training")
        if it + 1 < settings.iterations:  # the last round's labels would not be used
            labels_list = realign(aligner, items, jobs, shard_size)
        lap("realign")
    return {
        "utterances": len(items),
        "skipped": skipped,
        "frames": int(sum(f.shape[0] for f in feats_list)),
        "audio_seconds": samples / settings.frame_rate.sample_rate,
        "losses": losses,
        "seconds": time.time() - start_time,
        "phase_seconds": {phase: round(seconds, 3) for phase, seconds in phases.items()},
    }


def _train_on_rank(aligner, utterances, progress, jobs, shard_size):
    """:func:`train_aligner` on one of :func:`run_on_local_ranks`' ranks: rank 0 returns
    the trained model's state, prior and report."""
    report = train_aligner(aligner, utterances, progress and rank() == 0, jobs, shard_size)
    if rank() != 0:
        return None
    return aligner.model.state_dict(), aligner.log_prior, report


def realign(aligner, items, jobs=1, shard_size=REALIGN_SHARD):
    """Each utterance's frame labels, re-aligned with the aligner's current phone model.

    Arguments
    ---------
    aligner : PhoneAligner
    items : list of (utterance_id, features, TokenSequence)
    jobs : int
        Processes (per rank under ``torchrun``, where every rank calls this).
    shard_size : int
        Utterances per shard.

    Returns
    -------
    list of numpy.ndarray
        The state class of each frame, per utterance, in the order of ``items``.
    """
    model = aligner.model
    if aligner.device.type != "cpu":  # the same scores whoever computes them
        model = copy.deepcopy(model).cpu()
    return _sharded(_realign_shard, (model, aligner.log_prior, aligner.settings), items, jobs,
                    shard_size)


def _sharded(function, shared, items, jobs, shard_size):
    """``function(*shared, shard)`` over shards of ``items``, ``shard_size`` utterances
    each, in ``jobs`` processes and over the ranks: the labels of every item, in order."""
    tasks = {index: (*shared, items[start:stop])
             for index, (start, stop) in enumerate(shard_ranges(len(items), shard_size))}
    return [labels for _, shard in shard_results(function, tasks, jobs) for labels in shard]


def _realign_shard(model, log_prior, settings, items):
    labels = []
    for utt_id, feats, seq in items:
        scores = scaled_log_likelihoods(model, feats, log_prior, settings.prior_scale)
        positions, substates = state_path(scores, seq, settings, utt_id)
        labels.append(state_labels(
            positions.numpy(), _state_tokens(seq, settings), substates.numpy()
        ))
    return labels


def _state_tokens(sequence, settings):
    """:func:`state_tokens` of ``sequence`` with the aligner's state counts."""
    return state_tokens(sequence.tokens, settings.states_per_phone, settings.pause_states)


def flat_start_labels(feats, sequence, settings):
    """Energy-based edge silences and an even split of the rest over the phones.

    Arguments
    ---------
    feats : torch.Tensor
        Normalised features ``(T, n_mels)``.
    sequence : TokenSequence
    settings : AlignerSettings

    Returns
    -------
    numpy.ndarray
        The class of each frame.
    """
    tokens, optional = sequence.tokens, sequence.optional
    energy = feats.mean(1)
    lo, hi = float(energy.min()), float(energy.max())
    speech = torch.nonzero(energy > lo + settings.silence_energy * (hi - lo)).flatten()
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
    return state_labels(positions, _state_tokens(sequence, settings))


def ctc_targets(tokens, optional):
    """CTC targets: the phones and the edge silences (optional pauses between words left out).

    Example
    -------
    >>> ctc_targets([0, 5, 0, 7, 0], [True, False, True, False, True])
    [0, 5, 7, 0]
    """
    last = len(tokens) - 1
    return [
        t for k, (t, opt) in enumerate(zip(tokens, optional, strict=True))
        if not opt or k in (0, last)
    ]


def ctc_start_labels(aligner, items, progress, jobs=1, shard_size=REALIGN_SHARD):
    """First alignment from a CTC phone model: no initial segmentation needed.

    The phone model gets one extra (blank) output and is trained with CTC on the phone
    sequences framed by silence (recordings start and end in silence; without these
    targets the silence output stays untrained and the first phones spill into the
    leading pause); its blank-free, renormalised posteriors are then Viterbi-aligned. The
    blank output is dropped afterwards and frame-level training continues from these
    weights (loaded into ``aligner.model``). The CTC model trains on every rank, sharing
    the batches' parts (:func:`~sb_crossmodal_kd.alignment.batch_parts.shared_step`); its
    alignments are shared as :func:`realign`'s are.

    Arguments
    ---------
    aligner : PhoneAligner
    items : list of (utterance_id, features, TokenSequence)
    progress : bool
        Show a progress bar.
    jobs : int
        Processes (per rank under ``torchrun``, for the alignments).
    shard_size : int
        Utterances per alignment shard: a finer cut shares a small corpus better; the
        result does not depend on it.

    Returns
    -------
    list of numpy.ndarray
        The class of each frame, per utterance.
    """
    ctc_model = _ctc_model(aligner, items, progress)
    # Frame-level training continues from the CTC network's convolutions.
    aligner.model.convs.load_state_dict(ctc_model.convs.state_dict())
    return _sharded(_ctc_labels_shard, (ctc_model, aligner.settings), items, jobs, shard_size)


def _ctc_model(aligner, items, progress):
    """The CTC phone model of :func:`ctc_start_labels`, trained; on the CPU."""
    s = aligner.settings
    blank = len(PHONES)
    device = aligner.device
    with torch.random.fork_rng(devices=[]):  # the same initial weights on every rank
        torch.manual_seed(s.seed)
        ctc_model = PhoneClassifier(
            s.n_mels, len(PHONES) + 1, s.hidden, s.kernel_size, s.layers, s.dilation_growth
        ).to(device)
    optimiser = torch.optim.Adam(ctc_model.parameters(), lr=s.learning_rate)
    gen = torch.Generator().manual_seed(s.seed)
    # Batches of similar length keep padding small.
    order = sorted(range(len(items)), key=lambda i: items[i][1].shape[0])
    size = max(1, s.batch_size // 4)
    batches = [order[i : i + size] for i in range(0, len(order), size)]
    ctc_model.train()

    def loss_of_part(batch, start, stop):
        if start == stop:
            return None
        feats = [items[i][1] for i in batch[start:stop]]
        targets = [torch.tensor(ctc_targets(items[i][2].tokens, items[i][2].optional))
                   for i in batch[start:stop]]
        x = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True).to(device)
        log_probs = ctc_model(x).log_softmax(-1).transpose(0, 1)
        target_lengths = torch.tensor([len(t) for t in targets])
        losses = torch.nn.functional.ctc_loss(
            log_probs,
            torch.cat(targets).to(device),
            torch.tensor([f.shape[0] for f in feats]),
            target_lengths,
            blank=blank,
            reduction="none",
            zero_infinity=True,
        )
        # the batch's loss is the mean over its utterances of loss / target length
        return (losses / target_lengths.to(device).clamp_min(1)).sum() / len(batch)

    epochs = tqdm(range(s.ctc_epochs), desc="CTC phone model", leave=False,
                  disable=not progress or rank() != 0)
    for _ in epochs:
        for b in torch.randperm(len(batches), generator=gen).tolist():
            ranges = part_ranges(len(batches[b]), s.batch_parts)
            shared_step(ctc_model, optimiser,
                        lambda part, b=b, ranges=ranges: loss_of_part(batches[b], *ranges[part]),
                        s.batch_parts)
    return ctc_model.eval().cpu()


def _ctc_labels_shard(ctc_model, settings, items):
    blank = len(PHONES)
    labels = []
    for utt_id, feats, seq in items:
        with torch.no_grad():
            log_post = ctc_model(feats.unsqueeze(0))[0][:, :blank].log_softmax(-1)
        token_states = _state_tokens(seq, settings)
        # Room for every state of each token, as the state-level re-alignment needs.
        min_frames = [settings.min_duration * len(classes) for classes in token_states]
        path = viterbi_align(log_post, seq.tokens, min_frames, seq.optional, utt_id)
        labels.append(state_labels(path.numpy(), token_states))
    return labels


def train_frame_classifier(aligner, feats_list, labels_list, epochs, progress):
    """Trains ``aligner.model`` on frame labels, and sets ``aligner.log_prior`` from them.

    Arguments
    ---------
    aligner : PhoneAligner
    feats_list : list of torch.Tensor
        Normalised features ``(T, n_mels)`` per utterance.
    labels_list : list of numpy.ndarray
        The class of each frame, per utterance.
    epochs : int
    progress : bool
        Show a progress bar.

    Returns
    -------
    float
        The last batch's cross-entropy.
    """
    s = aligner.settings
    feats = torch.cat(feats_list)
    labels = torch.as_tensor(np.concatenate(labels_list))
    counts = torch.bincount(labels, minlength=aligner.n_classes).float() + 1.0
    aligner.log_prior = (counts / counts.sum()).log()
    n_chunks = max(1, feats.shape[0] // s.chunk_frames)
    # The whole training set on the model's device (about 1 GB at 5,000 LibriSpeech utterances):
    # batches are then slices, with no copy per step.
    feats = feats[: n_chunks * s.chunk_frames].reshape(n_chunks, s.chunk_frames, -1)
    feats = feats.to(aligner.device)
    labels = labels[: n_chunks * s.chunk_frames].reshape(n_chunks, s.chunk_frames)
    labels = labels.to(aligner.device)
    optimiser = torch.optim.Adam(aligner.model.parameters(), lr=s.learning_rate)
    gen = torch.Generator().manual_seed(s.seed)
    aligner.model.train()
    loss = torch.tensor(0.0)

    def loss_of_part(idx, start, stop):
        if start == stop:
            return None
        logits = aligner.model(feats[idx[start:stop]])
        # the batch's loss is the mean over all its frames
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[idx[start:stop]].reshape(-1),
            reduction="sum",
        ) / (len(idx) * s.chunk_frames)

    progress = progress and rank() == 0
    for _ in tqdm(range(epochs), desc="phone model epochs", disable=not progress, leave=False):
        order = torch.randperm(n_chunks, generator=gen)
        for i in range(0, n_chunks, s.batch_size):
            idx = order[i : i + s.batch_size]
            ranges = part_ranges(len(idx), s.batch_parts)
            loss = shared_step(aligner.model, optimiser,
                               lambda part, idx=idx, ranges=ranges: loss_of_part(idx, *ranges[part]),
                               s.batch_parts)
    aligner.model.eval()
    return float(loss.detach())  # once, after training: no host sync per step
