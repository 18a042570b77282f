"""Speech synthesis with eSpeak NG through ctypes, with word and phoneme timings.

eSpeak NG ships as a shared library inside the ``espeakng-loader`` wheel (GPL-3.0, installed
by the optional ``[demo]`` extra). This module imports it only when a synthesiser is made
(:func:`fresh_espeak`), so the rest of the library never depends on it.

eSpeak reports an event for each word and phoneme it speaks, with the sample position at
which it starts; we keep them as the reference alignment of the embedded corpus.
"""

import ctypes
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

# From speak_lib.h (API revision 12).
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 0x0001
_INITIALIZE_DONT_EXIT = 0x8000
_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_EVENT_LIST_TERMINATED = 0
_EVENT_WORD = 1
_EVENT_END = 5
_EVENT_MSG_TERMINATED = 6
_EVENT_PHONEME = 7
_PARAM_RATE = 1
_PARAM_VOLUME = 2
_PARAM_PITCH = 3
_PARAM_RANGE = 4
_PARAM_WORDGAP = 7
_EE_OK = 0


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event)
)


@dataclass
class Synthesis:
    """One synthesised utterance.

    Attributes
    ----------
    waveform : numpy.ndarray
        int16 samples at ``sample_rate``.
    sample_rate : int
        eSpeak's native rate (22050 Hz).
    words : list of (int, int, int)
        (text start character, text length, start sample) of each spoken word.
    phonemes : list of (str, int)
        (eSpeak phoneme mnemonic, start sample) of each phoneme, in order.
    """

    waveform: np.ndarray
    sample_rate: int
    words: list
    phonemes: list


class EspeakLibrary:
    """One loaded copy of the eSpeak NG library.

    eSpeak keeps synthesis state in static variables that carry from one utterance to the
    next (output then depends on what was said before). :func:`fresh_espeak` therefore loads
    a private copy of the library per utterance, so each utterance is a function of its own
    text and settings only; loading takes about 15 ms.

    Arguments
    ---------
    library_path : str
        Path of ``libespeak-ng`` to load.
    data_path : str
        Path of ``espeak-ng-data``.
    """

    def __init__(self, library_path, data_path):
        self._lib = ctypes.CDLL(library_path, mode=ctypes.RTLD_LOCAL)
        self._lib.espeak_Initialize.restype = ctypes.c_int
        self._lib.espeak_Initialize.argtypes = [
            ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int
        ]
        self._lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self._lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self._lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
            ctypes.c_uint, ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p,
        ]
        self.sample_rate = self._lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS,
            0,
            data_path.encode(),
            _INITIALIZE_PHONEME_EVENTS | _INITIALIZE_DONT_EXIT,
        )
        if self.sample_rate <= 0:
            raise RuntimeError(f"eSpeak NG failed to initialise from {data_path}")
        self._chunks = []
        self._events = []
        # Keep a reference so the callback is not garbage collected while the library holds it.
        self._callback = _SYNTH_CALLBACK(self._on_audio)
        self._lib.espeak_SetSynthCallback(self._callback)

    def close(self):
        """Frees eSpeak's memory and unloads this copy of the library."""
        import _ctypes

        self._lib.espeak_Terminate()
        _ctypes.dlclose(self._lib._handle)

    def _on_audio(self, wav, numsamples, events):
        if numsamples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(numsamples,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            event = events[i]
            if event.type == _EVENT_WORD:
                self._events.append(("word", event.text_position, event.length, event.sample))
            elif event.type == _EVENT_PHONEME:
                name = bytes(event.id.string).split(b"\0")[0].decode("utf-8", "replace")
                self._events.append(("phoneme", name, event.sample))
            i += 1
        return 0

    def synthesize(self, text, voice="en-us", rate=175, pitch=50, pitch_range=50, word_gap=0):
        """Synthesises ``text`` and returns a :class:`Synthesis`.

        Arguments
        ---------
        text : str
            What to say.
        voice : str
            eSpeak voice name, optionally with a variant, e.g. ``"en-us+f3"``.
        rate : int
            Words per minute (80 to 450).
        pitch, pitch_range : int
            Base pitch and its range, 0 to 100.
        word_gap : int
            Extra pause between words, in units of 10 ms.
        """
        if self._lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
            raise ValueError(f"eSpeak NG has no voice {voice!r}")
        for param, value in (
            (_PARAM_RATE, rate), (_PARAM_PITCH, pitch), (_PARAM_RANGE, pitch_range),
            (_PARAM_WORDGAP, word_gap), (_PARAM_VOLUME, 100),
        ):
            self._lib.espeak_SetParameter(param, int(value), 0)
        self._chunks, self._events = [], []
        # eSpeak draws noise from libc's process-wide rand(): seed it so output is repeatable.
        _libc().srand(0)
        data = text.encode("utf-8") + b"\0"
        status = self._lib.espeak_Synth(
            data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None
        )
        if status != _EE_OK:
            raise RuntimeError(f"eSpeak NG failed (status {status}) on {text!r}")
        self._lib.espeak_Synchronize()
        chunks, events = self._chunks, self._events
        self._chunks, self._events = [], []
        waveform = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)
        words = [(e[1] - 1, e[2], e[3]) for e in events if e[0] == "word"]
        phonemes = [(e[1], e[2]) for e in events if e[0] == "phoneme"]
        return Synthesis(waveform, self.sample_rate, words, phonemes)


def _libc():
    return ctypes.CDLL(None)


@contextmanager
def fresh_espeak():
    """Yields an :class:`EspeakLibrary` with pristine state (a private copy of the library).

    Example
    -------
    >>> with fresh_espeak() as tts:  # doctest: +SKIP
    ...     speech = tts.synthesize("turn on the lights", voice="en-us+f3")
    """
    try:
        import espeakng_loader
    except ImportError as err:
        raise ImportError(
            "Making the embedded corpus needs eSpeak NG: pip install 'sb-crossmodal-kd[demo]'"
        ) from err
    with tempfile.TemporaryDirectory(prefix="sbkd-espeak-") as folder:
        private = os.path.join(folder, "libespeak-ng.so")
        shutil.copyfile(espeakng_loader.get_library_path(), private)
        library = EspeakLibrary(private, espeakng_loader.get_data_path())
        try:
            yield library
        finally:
            library.close()
