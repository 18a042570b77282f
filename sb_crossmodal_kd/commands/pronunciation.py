"""The pronunciation options of every command that turns words into phones: one lexicon and
one out-of-vocabulary policy, the same for every step of a corpus.

Example
-------
>>> import argparse
>>> parser = argparse.ArgumentParser()
>>> add_pronunciation_options(parser)
>>> args = parser.parse_args(["--oov-policy", "skip"])
>>> args.lexicon, args.oov_policy
(None, 'skip')
"""

__all__ = ["add_pronunciation_options"]


def add_pronunciation_options(parser):
    """Registers ``--lexicon`` (default: the shipped CMUdict) and ``--oov-policy``."""
    parser.add_argument("--lexicon", default=None,
                        help="pronunciation lexicon file (CMUdict, librispeech-lexicon.txt or "
                             "Kaldi/MFA lexicon.txt); default: the CMUdict shipped with the "
                             "package. Use the same one for every step.")
    parser.add_argument("--oov-policy", choices=["skip", "g2p"], default="g2p",
                        help="skip utterances with unknown words, or pronounce them by g2p")
