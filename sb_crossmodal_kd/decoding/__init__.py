"""Decoding CTC outputs with a word n-gram language model.

- :mod:`.ngram`: word n-gram LMs, trained from a text file (interpolated Kneser-Ney) or
  read from an ARPA file (KenLM's ``lmplz``, SRILM, ...).
- :mod:`.beam_search`: CTC beam search over SentencePiece pieces with shallow fusion of
  such an LM (SpeechBrain's ``CTCBeamSearcher`` scoring words with it).
- :mod:`.tuning`: the LM weight and beam width chosen by WER on a validation set.
"""

from sb_crossmodal_kd.decoding.beam_search import NgramCTCBeamSearcher, VocabularyMismatchError
from sb_crossmodal_kd.decoding.ngram import ARPAFormatError, NgramLM, load_ngram, train_ngram
from sb_crossmodal_kd.decoding.tuning import choose_decoding_settings

__all__ = ["ARPAFormatError", "NgramCTCBeamSearcher", "NgramLM", "VocabularyMismatchError",
           "choose_decoding_settings", "load_ngram", "train_ngram"]
