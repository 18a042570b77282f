"""Decoding CTC outputs with a word n-gram language model.

- :mod:`.ngram`: word n-gram LMs, trained from a text file (interpolated Kneser-Ney) or
  read from an ARPA file (KenLM's ``lmplz``, SRILM, ...).
"""

from sb_crossmodal_kd.decoding.ngram import ARPAFormatError, NgramLM, load_ngram, train_ngram

__all__ = ["ARPAFormatError", "NgramLM", "load_ngram", "train_ngram"]
