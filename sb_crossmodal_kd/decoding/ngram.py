"""Word n-gram language models in the ARPA format.

:func:`train_ngram` estimates an interpolated Kneser-Ney model from a text file (one
sentence per line, words separated by spaces) and writes it as an ARPA file;
:func:`load_ngram` reads an ARPA file (this module's, or one made with KenLM's ``lmplz`` or
SRILM's ``ngram-count``; plain or gzipped) into an :class:`NgramLM` after checking that it
is a well-formed, normalised model. Queries go through SpeechBrain's ``BackoffNgramLM``.

The estimate (Chen and Goodman, 1998, "interpolated Kneser-Ney"): the top order counts
n-grams, each lower order counts the distinct words seen before an n-gram (n-grams that
start a sentence keep their counts), one absolute discount per order (Ney's
``n1 / (n1 + 2 n2)``, kept within [0.1, 0.9] for tiny texts), and the unigrams interpolate
with a uniform distribution over the words, ``</s>`` and ``<unk>``, so that every word has a
probability and ``<unk>`` takes that share for words never seen.

Example
-------
>>> import math, pathlib, tempfile
>>> text = pathlib.Path(tempfile.mkdtemp()) / "text.txt"
>>> _ = text.write_text("TURN ON THE LIGHT\\nTURN OFF THE LIGHT\\n")
>>> lm = train_ngram(text, text.with_suffix(".arpa"))  # a trigram LM
>>> lm.order, sorted(lm.words)
(3, ['LIGHT', 'OFF', 'ON', 'THE', 'TURN'])
>>> p_light, p_turn = (math.exp(lm.log_prob(word, ("ON", "THE"))) for word in ("LIGHT", "TURN"))
>>> p_light > 0.5 > p_turn
True
>>> again = load_ngram(text.with_suffix(".arpa"))
>>> again.log_prob("LIGHT", ("ON", "THE")) == lm.log_prob("LIGHT", ("ON", "THE"))
True
"""

import collections
import gzip
import math
from pathlib import Path

from speechbrain.lm.arpa import read_arpa
from speechbrain.lm.counting import ngrams, ngrams_for_evaluation, pad_ends
from speechbrain.lm.ngram import BackoffNgramLM, ngram_evaluation_details, ngram_perplexity
from speechbrain.utils.checkpoints import mark_as_loader, mark_as_saver, register_checkpoint_hooks

from sb_crossmodal_kd.io import atomic_path

__all__ = ["ARPAFormatError", "NgramLM", "load_ngram", "train_ngram"]

SENTENCE_START = "<s>"
SENTENCE_END = "</s>"
UNKNOWN_WORD = "<unk>"
SPECIAL_WORDS = frozenset({SENTENCE_START, SENTENCE_END, UNKNOWN_WORD})
# ARPA's log10 probability of an event that never happens (<s> as a predicted word)
IMPOSSIBLE_LOG10 = -99.0
DISCOUNT_RANGE = (0.1, 0.9)
# How far the unigram probabilities of a file read may sum from 1 (ARPA files round them)
UNIGRAM_SUM_TOLERANCE = 0.05
LN_10 = math.log(10.0)


class ARPAFormatError(ValueError):
    """An LM file that is not a well-formed, normalised ARPA n-gram model."""


class _EndOfFileBeforeEnd(Exception):
    """The file ended before its ``\\end\\`` line."""


def _lines_then_refuse_eof(handle):
    """The lines of ``handle``; raises at the end of the file, which ``read_arpa`` only
    reaches on a file without ``\\end\\`` (it would otherwise loop forever on one)."""
    yield from handle
    raise _EndOfFileBeforeEnd


@register_checkpoint_hooks
class NgramLM:
    """A backoff word n-gram LM: SpeechBrain's ``BackoffNgramLM`` tables, checked.

    Arguments
    ---------
    ngrams : dict, optional
        ``ngrams[n][context][word]``: log10 probability of ``word`` after the ``n - 1``
        words ``context`` (a tuple), as :func:`speechbrain.lm.arpa.read_arpa` returns.
    backoffs : dict, optional
        ``backoffs[n][words]``: log10 backoff weight of the ``n`` words ``words``.

    Without tables the LM is empty until SpeechBrain's ``Pretrainer`` (or a
    ``Checkpointer``) loads an ARPA file into it, as it loads a tokenizer.

    Raises
    ------
    ValueError
        Tables that are not an n-gram model of orders 1 to N, or whose probabilities are
        not log10 probabilities summing to 1 over the unigrams.

    Example
    -------
    >>> lm = NgramLM({1: {(): {"a": math.log10(0.75), "</s>": math.log10(0.25)}},
    ...               2: {("a",): {"a": math.log10(0.5)}}},
    ...              {1: {("a",): math.log10(0.5)}})
    >>> lm.order, sorted(lm.words)
    (2, ['a'])
    >>> round(math.exp(lm.log_prob("a", ("a",))), 3)  # listed
    0.5
    >>> round(math.exp(lm.log_prob("</s>", ("a",))), 3)  # backs off: 0.5 * 0.25
    0.125
    >>> lm.log_prob("b")
    -inf
    """

    def __init__(self, ngrams=None, backoffs=None):
        self._set(ngrams, backoffs)

    def _set(self, ngrams, backoffs):
        self._backoff_lm = None
        self.words = frozenset()
        if ngrams is None:
            return
        _check_tables(ngrams, backoffs)
        self._backoff_lm = BackoffNgramLM(ngrams, backoffs)
        self.words = frozenset(ngrams[1][()]) - SPECIAL_WORDS

    @property
    def loaded(self):
        """Whether the LM holds a model (an empty one waits for its ARPA file)."""
        return self._backoff_lm is not None

    @property
    def order(self):
        """The longest n-gram, N (0 while empty)."""
        return self._backoff_lm.top_order if self.loaded else 0

    @property
    def has_unknown_word(self):
        """Whether the model gives ``<unk>`` (any word it never saw) a probability."""
        return self.loaded and UNKNOWN_WORD in self._tables[1][()]

    @property
    def _tables(self):
        if not self.loaded:
            raise RuntimeError("The n-gram LM is empty: load an ARPA file into it first.")
        return self._backoff_lm.ngrams

    def log_prob(self, word, context=()):
        """Natural-log probability of ``word`` after the words ``context`` (a tuple; only
        its last N - 1 words count); ``-inf`` for a word the model does not know."""
        self._tables  # noqa: B018 - raises if empty
        return self._backoff_lm.logprob(word, tuple(context)) * LN_10

    def perplexity(self, sentences):
        """Perplexity on ``sentences`` (lists of words), ``</s>`` included; words the model
        does not know count as ``<unk>`` (``inf`` if it has no ``<unk>``)."""
        known = self.words | {SENTENCE_END}

        def with_unknown(words):
            return [word if word in known else UNKNOWN_WORD for word in words]

        details = ngram_evaluation_details(
            (ngrams_for_evaluation(pad_ends(with_unknown(words)), self.order)
             for words in sentences),
            self._backoff_lm,
        )
        return ngram_perplexity(details, logbase=10.0)

    def write_arpa(self, path):
        """Writes the model to ``path`` in the ARPA format, atomically."""
        ngrams = self._tables
        backoffs = self._backoff_lm.backoffs
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
            out.write("\\data\\\n")
            for n in sorted(ngrams):
                out.write(f"ngram {n}={sum(len(words) for words in ngrams[n].values())}\n")
            for n in sorted(ngrams):
                out.write(f"\n\\{n}-grams:\n")
                weights = backoffs.get(n, {})
                for context in sorted(ngrams[n]):
                    for word, log10_prob in sorted(ngrams[n][context].items()):
                        gram = (*context, word)
                        line = f"{log10_prob:.7g}\t{' '.join(gram)}"
                        if gram in weights:
                            line += f"\t{weights[gram]:.7g}"
                        out.write(line + "\n")
            out.write("\n\\end\\\n")

    @mark_as_saver
    def _save(self, path):
        self.write_arpa(path)

    @mark_as_loader
    def _load(self, path, end_of_epoch=False):
        loaded = load_ngram(path)
        self._set(loaded._tables, loaded._backoff_lm.backoffs)


def _check_tables(ngrams, backoffs):
    """Raises ``ValueError`` unless the tables are a normalised n-gram model."""
    orders = sorted(ngrams)
    if not orders or orders != list(range(1, len(orders) + 1)):
        raise ValueError(f"it lists n-grams of orders {orders}, not of every order from 1 to N")
    for n in orders:
        for context, words in ngrams[n].items():
            if len(context) != n - 1:
                raise ValueError(f"its {n}-grams section has an entry of {len(context) + 1} "
                                 f"words ({' '.join((*context, *words))[:60]!r})")
            bad = [w for w, p in words.items() if not (p <= 1e-4)]  # also catches nan
            if bad:
                raise ValueError(f"the {n}-gram {' '.join((*context, bad[0]))!r} has log10 "
                                 f"probability {words[bad[0]]}, above 0")
    if backoffs is None or len(backoffs) not in (len(orders), len(orders) - 1):
        raise ValueError("its backoff weights do not cover orders 1 to N - 1")
    unigrams = ngrams[1].get((), {})
    total = sum(10.0 ** p for w, p in unigrams.items() if w != SENTENCE_START)
    if abs(total - 1.0) > UNIGRAM_SUM_TOLERANCE:
        raise ValueError(f"its unigram probabilities sum to {total:.3g}, not 1")


def load_ngram(path):
    """Reads an ARPA file (``.gz`` for gzipped) into an :class:`NgramLM`.

    Arguments
    ---------
    path : str or Path
        The ARPA file.

    Returns
    -------
    NgramLM

    Raises
    ------
    FileNotFoundError, IsADirectoryError, PermissionError, OSError
        No such file, a folder, or a file that cannot be read; the message names it.
    ARPAFormatError
        A file that is not a well-formed ARPA model (e.g. KenLM's binary format, a truncated
        file, sections that do not match their declared counts, unnormalised unigrams).

    Example
    -------
    >>> import pathlib, tempfile
    >>> arpa = pathlib.Path(tempfile.mkdtemp()) / "lm.arpa"
    >>> _ = arpa.write_text("\\\\data\\\\\\nngram 1=2\\n\\n\\\\1-grams:\\n-0.30103 a\\n"
    ...                     "-0.30103 </s>\\n\\n\\\\end\\\\\\n")
    >>> load_ngram(arpa).order
    1
    >>> _ = arpa.write_text("\\\\data\\\\\\nngram 1=3\\n\\n\\\\1-grams:\\n-0.30103 a\\n"
    ...                     "-0.30103 </s>\\n\\n\\\\end\\\\\\n")
    >>> load_ngram(arpa)
    Traceback (most recent call last):
    ...
    sb_crossmodal_kd.decoding.ngram.ARPAFormatError: .../lm.arpa: not a well-formed ARPA n-gram model: it declares 3 1-grams but lists 2
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such LM file.")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder, not an LM file (pass the ARPA file).")
    opener = gzip.open if path.suffix == ".gz" else open
    malformed = f"{path}: not a well-formed ARPA n-gram model"
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            declared, ngrams, backoffs = read_arpa(_lines_then_refuse_eof(handle))
    except PermissionError as error:
        raise PermissionError(f"{path}: cannot read the LM file ({error.strerror}).") from error
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as error:
        raise ARPAFormatError(
            f"{malformed}: not ARPA text ({type(error).__name__}); a KenLM binary LM is not "
            "read, pass the ARPA file it was built from."
        ) from error
    except _EndOfFileBeforeEnd as error:
        raise ARPAFormatError(f"{malformed}: it ends before its \\end\\ line (truncated?), "
                              "or has no \\data\\ section.") from error
    except ValueError as error:  # read_arpa's report of a bad line or missing section
        raise ARPAFormatError(f"{malformed}: {error}.") from error
    except OSError as error:
        raise OSError(f"{path}: cannot read the LM file ({error}).") from error
    for n, count in declared.items():
        listed = sum(len(words) for words in ngrams.get(n, {}).values())
        if listed != count:
            raise ARPAFormatError(f"{malformed}: it declares {count} {n}-grams but lists {listed}")
    try:
        return NgramLM(ngrams, backoffs)
    except ValueError as error:
        raise ARPAFormatError(f"{malformed}: {error}") from error


# Training ----------------------------------------------------------------------------


def _read_sentences(text_file):
    """Each non-empty line of ``text_file`` as a list of words."""
    with open(text_file, encoding="utf-8") as handle:
        for line in handle:
            words = line.split()
            if words:
                yield words


def _count_ngrams(sentences, order):
    """``counts[n][gram]`` for n = 1..order over the sentences padded with ``<s>``/``</s>``."""
    counts = {n: collections.Counter() for n in range(1, order + 1)}
    for words in sentences:
        padded = tuple(pad_ends(words))
        for n in range(1, order + 1):
            counts[n].update(ngrams(padded, n))
    return counts


def _kneser_ney_counts(counts, order):
    """The counts Kneser-Ney estimates each order from: raw counts for the top order and
    for n-grams that start a sentence, else how many distinct words precede the n-gram."""
    adjusted = {order: dict(counts[order])}
    for n in range(order - 1, 0, -1):
        preceding = collections.Counter(gram[1:] for gram in counts[n + 1])
        adjusted[n] = {gram: count if gram[0] == SENTENCE_START else preceding[gram]
                       for gram, count in counts[n].items()}
    del adjusted[1][(SENTENCE_START,)]  # conditions, never predicted
    return adjusted


def _discount(counts):
    """Ney's absolute discount ``n1 / (n1 + 2 n2)`` from counts of counts, within
    :data:`DISCOUNT_RANGE` (a tiny text can have no count of 2)."""
    n1 = sum(1 for count in counts if count == 1)
    n2 = sum(1 for count in counts if count == 2)
    discount = n1 / (n1 + 2 * n2) if n1 + n2 else 0.5
    return min(max(discount, DISCOUNT_RANGE[0]), DISCOUNT_RANGE[1])


def _interpolated_kneser_ney(adjusted, order):
    """Log10 probabilities and backoff weights in ``BackoffNgramLM``'s layout."""
    vocabulary = {gram[0] for gram in adjusted[1]} | {UNKNOWN_WORD}
    probs = {0: {(): dict.fromkeys(vocabulary, 1.0 / len(vocabulary))}}  # order 0: uniform
    backoffs = {}
    for n in range(1, order + 1):
        discount = _discount(adjusted[n].values())
        totals, types = collections.Counter(), collections.Counter()
        for gram, count in adjusted[n].items():
            totals[gram[:-1]] += count
            types[gram[:-1]] += 1
        # The mass the discount frees in each context goes to the next lower order.
        lower_weight = {context: discount * types[context] / totals[context]
                        for context in totals}
        table = collections.defaultdict(dict)
        for gram, count in adjusted[n].items():
            context, word = gram[:-1], gram[-1]
            table[context][word] = ((count - discount) / totals[context]
                                    + lower_weight[context] * probs[n - 1][context[1:]][word])
        if n == 1:  # words never seen (<unk>) keep their share of the uniform distribution
            for word in vocabulary - set(table[()]):
                table[()][word] = lower_weight[()] * probs[0][()][word]
        else:
            backoffs[n - 1] = {context: math.log10(weight)
                               for context, weight in lower_weight.items()}
        probs[n] = table
    log10_probs = {n: {context: {word: math.log10(p) for word, p in words.items()}
                       for context, words in probs[n].items()}
                   for n in range(1, order + 1)}
    log10_probs[1][()][SENTENCE_START] = IMPOSSIBLE_LOG10
    return log10_probs, backoffs


def train_ngram(text_file, output, order=3):
    """Trains an interpolated Kneser-Ney word n-gram LM and writes it as an ARPA file.

    Arguments
    ---------
    text_file : str or Path
        Training text: one sentence per line, words separated by whitespace, in the form
        the recogniser outputs (same case and spelling as the transcripts).
    output : str or Path
        The ARPA file to write (atomically; ``.arpa`` by convention).
    order : int
        N, the longest n-gram (3: trigrams).

    Returns
    -------
    NgramLM
        The model as read back from ``output``.

    Raises
    ------
    ValueError
        ``order`` below 1, or a text with no words.

    Example
    -------
    >>> import math, pathlib, tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / "text.txt").write_text("a b\\na\\n")
    >>> lm = train_ngram(folder / "text.txt", folder / "bigram.arpa", order=2)
    >>> (folder / "bigram.arpa").read_text().splitlines()[1:3]
    ['ngram 1=5', 'ngram 2=4']

    Unigrams from continuation counts (a: 1, b: 1, </s>: 2; discount 0.5), bigrams from
    counts (discount 0.6), each interpolated with the order below:

    >>> round(math.exp(lm.log_prob("a")), 6)  # (1 - 0.5) / 4 + (0.5 * 3 / 4) / 4 words
    0.21875
    >>> round(math.exp(lm.log_prob("b", ("a",))), 6)  # (1 - 0.6) / 2 + (0.6 * 2 / 2) * 0.21875
    0.33125
    """
    if order < 1:
        raise ValueError(f"order must be at least 1, not {order}.")
    counts = _count_ngrams(_read_sentences(text_file), order)
    if not counts[1]:
        raise ValueError(f"{text_file}: no words to train an n-gram LM on.")
    log10_probs, backoffs = _interpolated_kneser_ney(_kneser_ney_counts(counts, order), order)
    NgramLM(log10_probs, backoffs).write_arpa(output)
    return load_ngram(output)
