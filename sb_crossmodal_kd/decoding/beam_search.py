"""CTC beam search over SentencePiece pieces with a word n-gram LM (shallow fusion).

:class:`NgramCTCBeamSearcher` is SpeechBrain's ``CTCBeamSearcher`` (the beam search of
pyctcdecode: hypotheses of the same text merged, words completed at each ``▁`` piece and
scored by the LM as they complete) with an :class:`~sb_crossmodal_kd.decoding.ngram.NgramLM`
in place of KenLM, so it needs nothing beyond SpeechBrain. A hypothesis scores

    log P_ctc(pieces | audio) + lm_weight * log P_lm(words) + word_insertion_bonus * #words

(``lm_weight`` and ``word_insertion_bonus`` are pyctcdecode's and SpeechBrain's ``alpha``
and ``beta``), with ``log P_lm`` including the end of the sentence. A word the LM does not
know costs ``unknown_word_penalty`` (natural log) on top of ``<unk>``'s probability, and so
does, while it is being spelled, a partial word that no LM word starts with; both are
weighted by ``lm_weight``, so ``lm_weight=0`` with no bonus is CTC beam search alone.

SpeechBrain's ``EncoderASR`` builds it from an exported model's hparams (a
``decoding_function`` naming this class and a ``test_beam_search`` with its settings; the
tokenizer's pieces come in as ``vocab_list``), and then returns the best hypothesis' text.
"""

import math
from pathlib import Path

import torch
from speechbrain.decoders.ctc import CTCBeamSearcher

from sb_crossmodal_kd.decoding.ngram import (
    SENTENCE_END,
    SENTENCE_START,
    UNKNOWN_WORD,
    NgramLM,
    load_ngram,
)

__all__ = ["DEFAULT_SETTINGS", "NgramCTCBeamSearcher", "VocabularyMismatchError",
           "spellable_words"]

WORD_START = "▁"  # SentencePiece's mark of a piece that begins a word
BLANK_LABEL = "<ctc_blank>"
# Below this share of the LM's words spellable by the pieces, LM and tokenizer are taken
# for a mismatch (other case, other language, another text normalisation).
MIN_SPELLABLE_FRACTION = 0.5
# The decoding settings when none are chosen (choose them on valid: decoding.tuning)
DEFAULT_SETTINGS = {"lm_weight": 0.5, "word_insertion_bonus": 0.0, "beam_width": 32}


class VocabularyMismatchError(ValueError):
    """An LM whose words the tokenizer's pieces cannot spell."""


def spellable_words(words, pieces):
    """The words that a sequence of ``pieces`` spells as one word: ``▁`` + the word.

    Arguments
    ---------
    words : iterable of str
        Words (without ``▁``).
    pieces : iterable of str
        SentencePiece pieces (``▁`` marks those that begin a word).

    Returns
    -------
    set of str

    Example
    -------
    >>> sorted(spellable_words(["CAT", "CAB", "cat", "DOG"], ["▁C", "A", "T", "▁", "D", "O"]))
    ['CAT']
    """
    pieces = {piece for piece in pieces if piece}
    longest = max(map(len, pieces), default=0)
    spellable = set()
    for word in words:
        spelling = WORD_START + word
        reachable = [True] + [False] * len(spelling)  # reachable[i]: spelling[:i] is spelled
        for start in range(len(spelling)):
            if reachable[start]:
                for end in range(start + 1, min(start + longest, len(spelling)) + 1):
                    if spelling[start:end] in pieces:
                        reachable[end] = True
        if reachable[-1]:
            spellable.add(word)
    return spellable


class NgramScorer:
    """Word scores of an n-gram LM in the interface SpeechBrain's CTC searchers call
    (``get_start_state``, ``score``, ``score_partial_token``, ``order``).

    A state is the tuple of the last N - 1 words (``<s>`` at the start).

    Arguments
    ---------
    lm : NgramLM
        The language model.
    words : set of str
        The LM's words that the pieces can spell (the only ones a hypothesis can hold).
    lm_weight, word_insertion_bonus, unknown_word_penalty : float
        As in :class:`NgramCTCBeamSearcher`.

    Example
    -------
    >>> lm = NgramLM({1: {(): {"<s>": -99.0, "A": math.log10(0.5), "</s>": math.log10(0.5)}}},
    ...              {})
    >>> scorer = NgramScorer(lm, {"A"}, lm_weight=1.0, word_insertion_bonus=0.0,
    ...                      unknown_word_penalty=-10.0)
    >>> score, state = scorer.score(scorer.get_start_state(), "A", is_last_word=True)
    >>> round(score, 4) == round(2 * math.log(0.5), 4), state
    (True, ())
    >>> scorer.score_partial_token("B")
    -10.0
    """

    def __init__(self, lm, words, lm_weight, word_insertion_bonus, unknown_word_penalty):
        self.lm = lm
        self.order = lm.order
        self.lm_weight = lm_weight
        self.word_insertion_bonus = word_insertion_bonus
        self.unknown_word_penalty = unknown_word_penalty
        self._words = frozenset(words)
        self._word_prefixes = frozenset(word[:end] for word in words
                                        for end in range(1, len(word) + 1))
        # <s> and </s> condition and end sentences when the LM has them (ARPA files do).
        self._start = ((SENTENCE_START,) if self.order > 1
                       and lm.log_prob(SENTENCE_START) > -math.inf else ())
        self._scores_end = lm.log_prob(SENTENCE_END) > -math.inf

    def get_start_state(self):
        """The state before the first word."""
        return self._start

    def _next_state(self, state, word):
        if self.order == 1:
            return ()
        state = (*state, word)
        return state[max(0, len(state) - (self.order - 1)):]

    def score(self, prev_state, word, is_last_word=False):
        """``(weighted LM score of word after prev_state [+ the sentence end], new state)``;
        ``word`` may be empty at the end (only the sentence end is scored)."""
        log_prob, state, bonus = 0.0, prev_state, 0.0
        if word:
            if word in self._words:
                log_prob = self.lm.log_prob(word, prev_state)
                state = self._next_state(prev_state, word)
            else:
                log_prob = self.unknown_word_penalty
                if self.lm.has_unknown_word:
                    log_prob += self.lm.log_prob(UNKNOWN_WORD, prev_state)
                state = self._next_state(prev_state, UNKNOWN_WORD)
            bonus = self.word_insertion_bonus
        if is_last_word and self._scores_end:
            log_prob += self.lm.log_prob(SENTENCE_END, state)
        return self.lm_weight * log_prob + bonus, state

    def score_partial_token(self, partial_word):
        """The penalty of a partial word that no LM word starts with (0 otherwise)."""
        if partial_word in self._word_prefixes:
            return 0.0
        return self.lm_weight * self.unknown_word_penalty


class NgramCTCBeamSearcher(CTCBeamSearcher):
    """CTC beam search with a word n-gram LM over SentencePiece pieces.

    Arguments
    ---------
    blank_index : int
        The CTC blank's output index (after the pieces in this package's models).
    vocab_list : list of str
        The tokenizer's pieces, in id order (``id_to_piece(i)``); the blank's own entry may
        be included at ``blank_index`` or left out when the blank comes after the pieces.
    language_model : NgramLM or str or Path
        The LM, or its ARPA file.
    lm_weight : float
        Weight of the LM's natural-log probabilities (0: no LM).
    word_insertion_bonus : float
        Added per word (counters the LM's preference for fewer words).
    beam_width : int
        Hypotheses kept after each frame.
    unknown_word_penalty : float
        Natural-log score of a word the LM does not know (weighted by ``lm_weight``).
    beam_prune_logp, token_prune_min_logp, prune_history
        SpeechBrain's pruning: hypotheses more than ``-beam_prune_logp`` below the best,
        and pieces under ``token_prune_min_logp`` in a frame, are dropped; hypotheses that
        differ only before the LM's context are merged.
    min_spellable_fraction : float
        Refuse an LM of which fewer of the words can be spelled with the pieces.

    Raises
    ------
    VocabularyMismatchError
        An LM whose words the pieces mostly cannot spell (LM and tokenizer do not match).
    ValueError
        Pieces that are not SentencePiece pieces, or an empty LM.

    Example
    -------
    Pieces ``▁A``, ``▁B``, blank; the audio is unsure between A and B in each of two
    words, and the LM has only seen "A B":

    >>> import pathlib, tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / "text.txt").write_text("A B\\n" * 10)
    >>> from sb_crossmodal_kd.decoding.ngram import train_ngram
    >>> lm = train_ngram(folder / "text.txt", folder / "lm.arpa", order=2)
    >>> frame_probs = torch.tensor([[0.6, 0.3, 0.1], [0.02, 0.02, 0.96], [0.6, 0.3, 0.1]])
    >>> log_probs = frame_probs.log()[None]  # [batch 1, 3 frames, 2 pieces + blank]
    >>> searcher = NgramCTCBeamSearcher(blank_index=2, vocab_list=["▁A", "▁B"],
    ...                                 language_model=lm, lm_weight=0.0)
    >>> searcher.transcribe(log_probs, torch.tensor([1.0]))  # acoustics alone
    ['A A']
    >>> searcher.configure(lm_weight=1.0)
    >>> searcher.transcribe(log_probs, torch.tensor([1.0]))
    ['A B']
    """

    def __init__(self, blank_index, vocab_list, language_model,
                 lm_weight=DEFAULT_SETTINGS["lm_weight"],
                 word_insertion_bonus=DEFAULT_SETTINGS["word_insertion_bonus"],
                 beam_width=DEFAULT_SETTINGS["beam_width"], unknown_word_penalty=-10.0,
                 beam_prune_logp=-10.0, token_prune_min_logp=-5.0, prune_history=True,
                 min_spellable_fraction=MIN_SPELLABLE_FRACTION):
        labels = list(vocab_list)
        if blank_index == len(labels):
            labels.append(BLANK_LABEL)
        elif 0 <= blank_index < len(labels):
            labels[blank_index] = BLANK_LABEL
        else:
            raise ValueError(f"blank_index {blank_index} is outside the {len(labels)} pieces "
                             "and the blank after them.")
        if not any(label.startswith(WORD_START) for label in labels):
            raise ValueError("The vocabulary has no SentencePiece pieces ('▁' word starts): "
                             "LM decoding takes a SentencePiece tokenizer's pieces.")
        super().__init__(blank_index=blank_index, vocab_list=labels, alpha=lm_weight,
                         beta=word_insertion_bonus, beam_size=beam_width,
                         beam_prune_logp=beam_prune_logp,
                         token_prune_min_logp=token_prune_min_logp,
                         prune_history=prune_history, spm_token=WORD_START)
        if isinstance(language_model, str | Path):
            language_model = load_ngram(language_model)
        if not isinstance(language_model, NgramLM) or not language_model.loaded:
            raise ValueError("language_model must be a loaded NgramLM or an ARPA file.")
        pieces = [label for label in labels if label != BLANK_LABEL]
        spellable = spellable_words(language_model.words, pieces)
        _check_vocabulary(language_model.words, spellable, len(pieces), min_spellable_fraction)
        self.lm = NgramScorer(language_model, spellable, lm_weight, word_insertion_bonus,
                              unknown_word_penalty)
        self._scoring_sentence_end = False

    @property
    def settings(self):
        """The decoding settings: ``lm_weight``, ``word_insertion_bonus``, ``beam_width``."""
        return {"lm_weight": self.lm.lm_weight,
                "word_insertion_bonus": self.lm.word_insertion_bonus,
                "beam_width": self.beam_size}

    def configure(self, lm_weight=None, word_insertion_bonus=None, beam_width=None):
        """Changes the given settings (the LM and vocabulary checks are kept)."""
        if lm_weight is not None:
            self.lm.lm_weight = self.alpha = float(lm_weight)
        if word_insertion_bonus is not None:
            self.lm.word_insertion_bonus = self.beta = float(word_insertion_bonus)
        if beam_width is not None:
            self.beam_size = int(beam_width)

    def decode_beams(self, log_probs, wav_lens=None, lm_start_state=None):
        """Hypotheses, best first, for each utterance of a batch.

        Arguments
        ---------
        log_probs : torch.Tensor
            ``[B, T, V + 1]`` CTC log-probabilities (pieces and blank), any device.
        wav_lens : torch.Tensor, optional
            ``[B]`` lengths relative to ``T`` (SpeechBrain's convention); all ``T`` if None.
        lm_start_state : tuple, optional
            LM context to start from (``(<s>,)`` by default).

        Returns
        -------
        list of list of speechbrain.decoders.ctc.CTCHypothesis
        """
        if log_probs.dim() != 3 or log_probs.size(-1) != len(self.vocab_list):
            raise ValueError(
                f"log_probs of shape {tuple(log_probs.shape)} do not fit the decoder: it "
                f"expects [batch, frames, {len(self.vocab_list)}] (the tokenizer's "
                f"{len(self.vocab_list) - 1} pieces and the blank)."
            )
        frames = log_probs.size(1)
        if wav_lens is None:
            lengths = [frames] * log_probs.size(0)
        else:  # rounded as SpeechBrain's greedy decoding does (no lost last frame)
            lengths = torch.round(wav_lens.detach().float().cpu() * frames).int().tolist()
        # One transfer per batch: the search runs on the host.
        log_probs = log_probs.detach().float().cpu().numpy()
        return [self.decode_log_probs(utterance, length, lm_start_state)
                for utterance, length in zip(log_probs, lengths, strict=True)]

    def transcribe(self, log_probs, wav_lens=None):
        """The best hypothesis' text for each utterance (``[B, T, V + 1]``, ``[B]`` -> B
        strings); see :meth:`decode_beams`."""
        return [hyps[0].text if hyps else "" for hyps in self.decode_beams(log_probs, wav_lens)]

    # SpeechBrain's search never scores the sentence end when it completes the last words;
    # these two pass the end on to the LM so that hypotheses stopping mid-sentence pay for it.
    def finalize_decoding(self, beams, cached_lm_scores, cached_p_lm_scores,
                          force_next_word=False, is_end=False):
        self._scoring_sentence_end = is_end
        try:
            return super().finalize_decoding(beams, cached_lm_scores, cached_p_lm_scores,
                                             force_next_word=force_next_word, is_end=is_end)
        finally:
            self._scoring_sentence_end = False

    def get_lm_beams(self, beams, cached_lm_scores, cached_partial_token_scores, is_eos=False):
        return super().get_lm_beams(beams, cached_lm_scores, cached_partial_token_scores,
                                    is_eos=is_eos or self._scoring_sentence_end)


def _check_vocabulary(words, spellable, n_pieces, min_fraction):
    """Raises :class:`VocabularyMismatchError` unless most LM words can be spelled."""
    if not words:
        raise VocabularyMismatchError("The LM has no words (only <s>, </s>, <unk>).")
    if len(spellable) >= min_fraction * len(words):
        return
    examples = ", ".join(sorted(set(words) - spellable)[:5])
    raise VocabularyMismatchError(
        f"The LM does not match the tokenizer: only {len(spellable)} of its {len(words)} "
        f"words can be spelled with the tokenizer's {n_pieces} pieces (not, e.g.: "
        f"{examples}). Train the LM on text written as the transcripts are (same case, "
        "characters and normalisation), e.g. the text the tokenizer was trained on."
    )
