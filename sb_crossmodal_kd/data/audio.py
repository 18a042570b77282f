"""Reading audio at the rate a model wants, whatever rate the file has.

Users' corpora come at the rates they were recorded at (8 kHz telephone speech, 44.1 kHz
studio audio); the recipes' models, aligner and features expect one ``sample_rate``. Every
reader of the package loads audio through :func:`load_audio`, which averages the channels
to mono and resamples on load with SpeechBrain's ``AudioNormalizer`` (its resampling kernels
are kept per source rate, so a corpus at one rate costs one kernel). The manifest check
(:func:`~sb_crossmodal_kd.data.manifest.check_manifest` with ``sample_rate``) logs once per
manifest how many files will be resampled, so nothing happens silently.
"""

import math

import soundfile
import torch
from speechbrain.dataio.preprocess import AudioNormalizer

__all__ = ["load_audio", "audio_samples"]

_NORMALIZERS = {}  # target rate -> AudioNormalizer (it caches a resampler per source rate)


def load_audio(path, sample_rate):
    """The audio file ``path`` as a mono float waveform ``[S]`` at ``sample_rate`` Hz.

    Arguments
    ---------
    path : str or Path
        A file soundfile reads (WAV, FLAC, OGG, ...).
    sample_rate : int
        The rate to return; a file at another rate is resampled, several channels averaged.

    Example
    -------
    >>> import tempfile, pathlib, numpy
    >>> from sb_crossmodal_kd.io import write_wav_atomic
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "telephone.wav"
    >>> write_wav_atomic(path, numpy.zeros(8000, dtype="float32"), 8000)  # 1 s at 8 kHz
    >>> load_audio(path, 16000).shape
    torch.Size([16000])
    """
    audio, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    normalizer = _NORMALIZERS.get(sample_rate)
    if normalizer is None:
        normalizer = _NORMALIZERS[sample_rate] = AudioNormalizer(sample_rate=sample_rate)
    return normalizer(torch.from_numpy(audio), rate)


def audio_samples(path, sample_rate):
    """How many samples :func:`load_audio` gives for ``path`` at ``sample_rate``, from the
    file's header only (frame counts of alignments and units need no audio decoded).

    Example
    -------
    >>> import tempfile, pathlib, numpy
    >>> from sb_crossmodal_kd.io import write_wav_atomic
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "telephone.wav"
    >>> write_wav_atomic(path, numpy.zeros(4801, dtype="float32"), 8000)
    >>> audio_samples(path, 16000), len(load_audio(path, 16000))
    (9602, 9602)
    """
    info = soundfile.info(str(path))
    if info.samplerate == sample_rate:
        return info.frames
    # torchaudio's resampling returns ceil(length * new / old) samples
    return math.ceil(info.frames * sample_rate / info.samplerate)
