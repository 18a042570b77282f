"""SynthCommands: the embedded speech corpus, made locally with eSpeak NG.

Transcripts come from :class:`~sb_crossmodal_kd.data.grammar.DomainGrammar`; each speaker is
an eSpeak voice and variant with its own base rate and pitch, varied per utterance; noise is
added at a signal-to-noise ratio drawn around ``snr_db``. Train, valid and test are disjoint
in sentences and in speakers, and valid and test each speak with an eSpeak base voice (accent)
that no train speaker has; a text-only corpus (disjoint from all speech sentences)
serves LM training. Everything is a deterministic function of the settings and ``seed``.

Layout of ``output_dir``::

    corpus.json                 settings the corpus was made with (checked on re-runs)
    {train,valid,test}.csv      SpeechBrain manifests: ID, duration, wav, spk_id, wrd
    {split}_alignments.json     {ID: {"words": [[w, start_s, end_s]], "phones": [[p, s, e]]}}
                                (a "word" may be a group eSpeak spoke as one, e.g. "in the")
    wav/{split}/{ID}.wav        16 kHz mono 16-bit
    lm_text/{train,valid}.txt   text-only corpus, one sentence per line

The alignments are eSpeak's own word and phoneme events, phonemes mapped to ARPAbet
(:mod:`~sb_crossmodal_kd.data.espeak_phones`): a reference for evaluating aligners.
"""

import contextlib
import csv
import io
import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torchaudio
from tqdm import tqdm

from sb_crossmodal_kd.data.espeak_phones import phone_segments
from sb_crossmodal_kd.data.grammar import DomainGrammar
from sb_crossmodal_kd.io import atomic_write_text, write_wav_atomic
from sb_crossmodal_kd.prep.provenance import Provenance
from sb_crossmodal_kd.workers import worker_pool

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
CORPUS_VERSION = 2  # 2: valid and test base voices held out of train

_BASE_VOICES = (
    "en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-us-nyc", "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
)
# Variants f2, f3 and f5 are left out: their output depends on what the process synthesised
# before (checked by tests/test_corpus.py), which would break the corpus's determinism.
_VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f4", "klatt",
    "klatt2", "klatt3", "klatt4", "croak", "Andy", "Annie", "Denis", "Gene", "Jacky", "Lee",
    "Marco", "Mike", "Reed", "Storm", "adam", "anika", "david", "edward", "john", "linda",
    "max", "michel", "norbert", "robert", "steph", "travis", "zac",
)


@dataclass(frozen=True)
class CorpusSettings:
    """Everything a SynthCommands corpus is a function of.

    Arguments
    ---------
    n_train, n_valid, n_test : int
        Utterances per split.
    n_text : int
        Sentences of the text-only LM corpus (``n_text_valid`` more are held out).
    n_text_valid : int
        Held-out sentences of the text-only corpus, for LM perplexity.
    speakers : tuple of int
        Speakers (voice + variant + base prosody) for train, valid and test.
    snr_db : float
        Centre of the signal-to-noise ratio; each utterance draws from +-5 dB around it.
    sample_rate : int
        Sample rate of the written wav files.
    seed : int
        Seed of sentences, speakers, prosody and noise.
    """

    n_train: int = 1200
    n_valid: int = 150
    n_test: int = 300
    n_text: int = 50000
    n_text_valid: int = 2000
    speakers: tuple = (36, 6, 10)
    snr_db: float = 20.0
    sample_rate: int = 16000
    seed: int = 1234

    def __post_init__(self):
        for name in ("n_train", "n_valid", "n_test"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if len(self.speakers) != 3 or min(self.speakers) < 1:
            raise ValueError(f"speakers must be three positive counts, got {self.speakers}")
        limits = ((len(_BASE_VOICES) - 2) * len(_VARIANTS), len(_VARIANTS), len(_VARIANTS))
        for split, count, limit in zip(SPLITS, self.speakers, limits, strict=True):
            if count > limit:
                raise ValueError(
                    f"speakers asks for {count} {split} speakers; at most {limit} distinct "
                    f"voices exist for {split} (valid and test each have one base voice of "
                    f"their own, with {len(_VARIANTS)} variants)"
                )


def _speakers(settings):
    """Draws disjoint speaker sets for the three splits, unseen in voice at test time.

    The base voices are dealt out first: one for test, one for valid, the rest for train, so
    valid and test speakers speak with an eSpeak voice (accent) that no train speaker has,
    not only in another variant of a voice heard in training. Each speaker is then a base
    voice of its split with a variant and its own rate, pitch and pitch range.
    """
    rng = random.Random(settings.seed)
    voices = list(_BASE_VOICES)
    rng.shuffle(voices)
    pools = {"test": voices[:1], "valid": voices[1:2], "train": voices[2:]}
    speakers = {}
    for split, count in zip(("train", "valid", "test"), settings.speakers, strict=True):
        combos = [(v, var) for v in pools[split] for var in _VARIANTS]
        rng.shuffle(combos)
        speakers[split] = [
            {
                "voice": f"{voice}+{variant}",
                "rate": rng.randint(135, 195),
                "pitch": rng.randint(30, 70),
                "range": rng.randint(30, 80),
            }
            for voice, variant in combos[:count]
        ]
    return speakers


def _sentences(settings):
    """Disjoint sentence sets for the speech splits and the text-only corpus."""
    grammar = DomainGrammar()
    counts = [settings.n_train, settings.n_valid, settings.n_test]
    speech = grammar.sentences(sum(counts), seed=settings.seed)
    out = {}
    start = 0
    for split, n in zip(SPLITS, counts, strict=True):
        out[split] = speech[start : start + n]
        start += n
    text = grammar.sentences(
        settings.n_text + settings.n_text_valid, seed=settings.seed + 1, exclude=speech
    )
    out["lm_train"] = text[: settings.n_text]
    out["lm_valid"] = text[settings.n_text :]
    return out


def _add_noise(waveform, snr_db, rng):
    """Adds coloured noise (a random mix of white and brown) at ``snr_db``."""
    white = rng.standard_normal(len(waveform))
    brown = np.cumsum(rng.standard_normal(len(waveform)))
    brown -= np.convolve(brown, np.ones(401) / 401, mode="same")  # keep it zero-mean locally
    mix = rng.uniform(0.0, 1.0)
    noise = mix * white / (white.std() + 1e-9) + (1 - mix) * brown / (brown.std() + 1e-9)
    signal_power = np.mean(waveform**2) + 1e-12
    noise_power = np.mean(noise**2) + 1e-12
    scale = np.sqrt(signal_power / (noise_power * 10 ** (snr_db / 10)))
    return waveform + scale * noise


def synthesize_utterance(text, speaker, rng, snr_db, sample_rate):
    """Speaks ``text`` with ``speaker``, varied by ``rng``; returns audio and timings.

    Returns
    -------
    waveform : numpy.ndarray
        float32 at ``sample_rate``, peak below 1.
    words : list of [str, float, float]
        Each word with start and end in seconds.
    phones : list of [str, float, float]
        Contiguous ARPAbet phone segments covering the whole audio, in seconds.
    """
    from sb_crossmodal_kd.data.espeak import fresh_espeak

    with fresh_espeak() as tts:
        synth = tts.synthesize(
            text,
            voice=speaker["voice"],
            rate=speaker["rate"] + rng.integers(-15, 16),
            pitch=int(np.clip(speaker["pitch"] + rng.integers(-8, 9), 0, 100)),
            pitch_range=speaker["range"],
            word_gap=int(rng.integers(0, 3)),
        )
    if synth.waveform.size == 0:
        raise RuntimeError(f"eSpeak NG produced no audio for {text!r} ({speaker['voice']})")
    lead, tail = (int(rng.uniform(0.05, 0.3) * synth.sample_rate) for _ in range(2))
    audio = np.concatenate(
        [np.zeros(lead), synth.waveform.astype(np.float64) / 32768.0, np.zeros(tail)]
    )
    audio = torchaudio.functional.resample(
        torch.from_numpy(audio).float(), synth.sample_rate, sample_rate
    ).numpy()
    audio = _add_noise(audio.astype(np.float64), rng.uniform(snr_db - 5, snr_db + 5), rng)
    audio = (audio * (rng.uniform(0.3, 0.9) / (np.abs(audio).max() + 1e-9))).astype(np.float32)

    segments = phone_segments(
        [(m, s + lead) for m, s in synth.phonemes], len(synth.waveform) + lead + tail
    )
    seconds = 1.0 / synth.sample_rate
    phones = [[p, round(s * seconds, 4), round(e * seconds, 4)] for p, s, e in segments]
    words = _word_times(text, synth.words, segments, lead, seconds)
    return audio, words, phones


def _word_times(text, word_events, segments, lead, seconds):
    """Word timings from eSpeak's word events, in transcript order.

    A word spans its own non-silence phones, those starting between its event and the next
    word's event (pauses between words belong to neither). eSpeak sometimes speaks a function
    word with its neighbour as one unit and reports a single event ("in the"): such a group
    is one entry whose text holds both words, so the entries always join to the transcript.
    """
    starts = [s + lead for _, _, s in word_events]
    positions = [pos for pos, _, _ in word_events] + [len(text)]
    words = []
    for i in range(len(word_events)):
        start = starts[i]
        limit = starts[i + 1] if i + 1 < len(starts) else float("inf")
        own = [(s, e) for p, s, e in segments if p != "sil" and start <= s < limit]
        if own:
            start, end = own[0][0], own[-1][1]
        else:
            end = start
        group = text[positions[i] : positions[i + 1]].strip()
        words.append([group, round(start * seconds, 4), round(end * seconds, 4)])
    if " ".join(w for w, _, _ in words) != text:
        raise RuntimeError(f"eSpeak's word events do not cover the transcript {text!r}")
    return words


def make_corpus(output_dir, progress=True, jobs=1, **settings):
    """Makes (or completes) a SynthCommands corpus in ``output_dir``.

    Re-running with the same settings skips what is complete; a split whose manifest is
    missing is rebuilt, each file written atomically. A folder made with other settings, or
    one that holds files of another origin, is refused rather than overwritten.

    Arguments
    ---------
    output_dir : str or Path
        Where to write the corpus.
    progress : bool
        Show a progress bar per split.
    jobs : int
        Processes that synthesise utterances side by side. Every utterance draws from its
        own seed, so the corpus is the same, byte for byte, whatever ``jobs`` is.
    **settings
        Fields of :class:`CorpusSettings`.

    Returns
    -------
    dict
        Paths: ``{"train": csv, "valid": csv, "test": csv, "lm_train": txt, "lm_valid": txt}``.
    """
    settings = CorpusSettings(**settings)
    output_dir = Path(output_dir).resolve()
    record = Provenance(output_dir / "corpus.json", asdict(settings),
                        f"{output_dir} holds a SynthCommands corpus made",
                        source={"corpus": "SynthCommands", "version": CORPUS_VERSION},
                        remedy="Choose another output folder or delete that one")
    if not record.found and output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(
            f"{output_dir} is not empty and holds no corpus.json: it was not made by "
            "`sbkd corpus`. Choose an empty or new folder; nothing was changed."
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    record.write()  # first, so that an interrupted corpus is completed, not refused

    sentences = _sentences(settings)
    speakers = _speakers(settings)
    paths = {}
    for split_index, split in enumerate(SPLITS):
        csv_path = output_dir / f"{split}.csv"
        align_path = output_dir / f"{split}_alignments.json"
        paths[split] = csv_path
        if csv_path.exists() and align_path.exists():
            continue
        wav_dir = output_dir / "wav" / split
        wav_dir.mkdir(parents=True, exist_ok=True)
        rows, alignments = [], {}
        count = len(speakers[split])
        utterances = [
            _Utterance(text, speakers[split][i % count], f"{split}_spk{i % count:02d}",
                       (settings.seed, split_index, i), wav_dir, settings.snr_db,
                       settings.sample_rate)
            for i, text in enumerate(sentences[split])
        ]
        with _pool(jobs) as pool:
            spoken = pool.map(_speak, utterances, chunksize=8) if pool else map(_speak, utterances)
            for row, alignment in tqdm(spoken, total=len(utterances),
                                       desc=f"SynthCommands {split}", disable=not progress):
                rows.append(row)
                alignments[row["ID"]] = alignment
        atomic_write_text(align_path, json.dumps(alignments) + "\n")
        atomic_write_text(csv_path, _csv_text(rows))
    lm_dir = output_dir / "lm_text"
    lm_dir.mkdir(exist_ok=True)
    for name, key in (("train", "lm_train"), ("valid", "lm_valid")):
        path = lm_dir / f"{name}.txt"
        paths[key] = path
        if not path.exists():
            atomic_write_text(path, "\n".join(sentences[key]) + "\n")
    return paths


@dataclass(frozen=True)
class _Utterance:
    """What one utterance of a split is made from (``seed`` = corpus seed, split, index)."""

    text: str
    speaker: dict
    spk_id: str
    seed: tuple
    wav_dir: Path
    snr_db: float
    sample_rate: int


def _speak(utterance):
    """Synthesises and writes one utterance; returns its manifest row and alignment."""
    index = utterance.seed[-1]
    utt_id = f"{utterance.spk_id}_{index:05d}"
    audio, words, phones = synthesize_utterance(
        utterance.text, utterance.speaker, np.random.default_rng(list(utterance.seed)),
        utterance.snr_db, utterance.sample_rate
    )
    wav_path = utterance.wav_dir / f"{utt_id}.wav"
    if not wav_path.exists():
        write_wav_atomic(wav_path, audio, utterance.sample_rate)
    row = {
        "ID": utt_id,
        "duration": f"{len(audio) / utterance.sample_rate:.3f}",
        "wav": str(wav_path),
        "spk_id": utterance.spk_id,
        "wrd": utterance.text,
    }
    return row, {"voice": utterance.speaker["voice"], "words": words, "phones": phones}


@contextlib.contextmanager
def _pool(jobs):
    """A process pool of ``jobs`` workers (a data chain's shared one), or None for
    ``jobs <= 1`` (work in this process)."""
    if jobs <= 1:
        yield None
        return
    with worker_pool(jobs) as pool:
        yield pool


def _csv_text(rows):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["ID", "duration", "wav", "spk_id", "wrd"])
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
