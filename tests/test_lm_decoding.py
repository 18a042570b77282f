"""Word n-gram LMs and CTC beam search with them: probabilities, decoding, bad LM files.

The LMs and tokenizers are built here from a few sentences; log-probabilities are made by
hand so that what the acoustics alone say is known.
"""

import gzip
import math
import re

import pytest
import sentencepiece
import torch
from speechbrain.decoders import ctc_greedy_decode

from sb_crossmodal_kd.decoding import (
    ARPAFormatError,
    NgramCTCBeamSearcher,
    VocabularyMismatchError,
    load_ngram,
    train_ngram,
)

SENTENCES = [
    "TURN ON THE KITCHEN LIGHTS",
    "SWITCH OFF THE OVEN",
    "TURN ON THE BEDROOM LIGHTS",
    "SET AN ALARM FOR SIX",
    "DIM THE KITCHEN LIGHTS",
    "SWITCH OFF THE RADIO IN THE KITCHEN",
]


def write_text(path, sentences):
    path.write_text("".join(f"{sentence}\n" for sentence in sentences))
    return path


@pytest.fixture
def trigram(tmp_path):
    return train_ngram(write_text(tmp_path / "text.txt", SENTENCES * 3), tmp_path / "lm.arpa")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A real SentencePiece model of 30 pieces on the sentences."""
    folder = tmp_path_factory.mktemp("sp")
    text = write_text(folder / "text.txt", SENTENCES * 5)
    sentencepiece.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(folder / "sp"), vocab_size=30, model_type="unigram",
        character_coverage=1.0, minloglevel=2)
    return sentencepiece.SentencePieceProcessor(model_file=str(folder / "sp.model"))


def pieces_of(tokenizer):
    return [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size())]


def test_kneser_ney_bigram_matches_the_hand_computed_model(tmp_path):
    # "a b", "a": unigram continuation counts a 1, b 1, </s> 2 (discount 1 / (2 + 2) = 0.5,
    # 0.375 of the mass spread over a, b, </s>, <unk>); bigram counts <s> a 2, a b 1,
    # a </s> 1, b </s> 1 (discount 3 / (3 + 2) = 0.6).
    lm = train_ngram(write_text(tmp_path / "text.txt", ["a b", "a"]), tmp_path / "lm.arpa",
                     order=2)
    expected = {
        ("a", ()): 0.5 / 4 + 0.375 / 4,
        ("</s>", ()): 1.5 / 4 + 0.375 / 4,
        ("<unk>", ()): 0.375 / 4,
        ("a", ("<s>",)): 1.4 / 2 + 0.6 / 2 * 0.21875,
        ("b", ("a",)): 0.4 / 2 + 0.6 * 0.21875,
        ("</s>", ("a",)): 0.4 / 2 + 0.6 * 0.46875,
        ("a", ("a",)): 0.6 * 0.21875,  # unseen bigram: the backoff weight times p(a)
        ("</s>", ("b",)): 0.4 + 0.6 * 0.46875,
    }
    for (word, context), probability in expected.items():
        assert math.exp(lm.log_prob(word, context)) == pytest.approx(probability, rel=1e-6)
    assert lm.log_prob("c", ("a",)) == -math.inf


def test_every_context_is_a_normalised_distribution(trigram, tmp_path):
    vocabulary = sorted(trigram.words | {"</s>", "<unk>"})
    contexts = {(), ("<s>",), ("THE",), ("<s>", "TURN"), ("ON", "THE"), ("THE", "KITCHEN"),
                ("OVEN", "THE"), ("NEVER", "SEEN")}  # the last two: contexts never seen
    gzipped = tmp_path / "lm.arpa.gz"
    gzipped.write_bytes(gzip.compress((tmp_path / "lm.arpa").read_bytes()))
    for lm in (trigram, load_ngram(gzipped)):
        for context in contexts:
            total = sum(math.exp(lm.log_prob(word, context)) for word in vocabulary)
            assert total == pytest.approx(1.0, abs=1e-5), context
    # Seen text is likely, its perplexity far below the vocabulary size.
    assert trigram.perplexity([s.split() for s in SENTENCES]) < 3 < len(vocabulary)


def test_arpa_written_by_another_tool_loads(tmp_path):
    arpa = tmp_path / "lmplz.arpa"  # lmplz's layout: tabs, <unk> first, <s> at -99
    arpa.write_text("\\data\\\nngram 1=4\nngram 2=2\n\n\\1-grams:\n-1\t<unk>\t0\n"
                    "-99\t<s>\t-0.30103\n-0.30103\tA\t-0.30103\n-0.39794\t</s>\t0\n\n"
                    "\\2-grams:\n-0.09691\t<s> A\n-0.09691\tA </s>\n\n\\end\\\n")
    lm = load_ngram(arpa)
    assert lm.order == 2 and lm.words == {"A"} and lm.has_unknown_word
    assert math.exp(lm.log_prob("A", ("A",))) == pytest.approx(0.5 * 0.5, rel=1e-4)


def greedy_texts(log_probs, lengths, pieces):
    blank = len(pieces)
    return ["".join(pieces[i] for i in ids).replace("▁", " ").strip()
            for ids in ctc_greedy_decode(log_probs, lengths, blank_id=blank)]


def frames_for(piece_ids, vocabulary_size, confidence=0.9, blank_frames=1):
    """Log-probs of each piece for 2 frames then ``blank_frames`` blanks; the rest of each
    frame's mass spread over the other outputs. ``piece_ids`` items may be dicts
    {id: probability} for frames the acoustics are unsure of."""
    rows = []
    n = vocabulary_size + 1

    def row(probabilities):
        rest = (1.0 - sum(probabilities.values())) / (n - len(probabilities))
        return [probabilities.get(i, rest) for i in range(n)]

    for item in piece_ids:
        probabilities = item if isinstance(item, dict) else {item: confidence}
        rows += [row(probabilities)] * 2 + [row({vocabulary_size: confidence})] * blank_frames
    return torch.tensor(rows).log()


def test_without_lm_weight_the_search_is_greedy_decoding(tokenizer, trigram):
    pieces = pieces_of(tokenizer)
    sentences = ["TURN ON THE OVEN", "SET AN ALARM", "DIM THE BEDROOM LIGHTS IN THE KITCHEN"]
    utterances = [frames_for(tokenizer.encode(s), len(pieces)) for s in sentences]
    frames = max(len(u) for u in utterances)
    batch = torch.stack([torch.nn.functional.pad(u, (0, 0, 0, frames - len(u)), value=0.0)
                         for u in utterances])  # padding frames would decode as piece 0
    lengths = torch.tensor([len(u) / frames for u in utterances])
    searcher = NgramCTCBeamSearcher(len(pieces), pieces, trigram, lm_weight=0.0, beam_width=8)
    assert greedy_texts(batch, lengths, pieces) == sentences
    assert searcher.transcribe(batch, lengths) == sentences


PIECES = ["▁TURN", "▁ON", "▁OFF", "▁THE", "▁KITCHEN", "▁LIGHTS", "▁SWITCH", "▁OVEN",
          "▁BEDROOM", "▁SET", "▁AN", "▁ALARM", "▁FOR", "▁SIX", "▁DIM", "▁RADIO", "▁IN"]


def test_an_lm_that_knows_the_sentence_fixes_what_greedy_gets_wrong(trigram):
    # "TURN ? THE KITCHEN LIGHTS": the acoustics favour OFF (0.5) over ON (0.4); the LM has
    # only seen "TURN ON" and "SWITCH OFF".
    ids = {piece[1:]: i for i, piece in enumerate(PIECES)}
    unsure = {ids["OFF"]: 0.5, ids["ON"]: 0.4}
    log_probs = frames_for([ids["TURN"], unsure, ids["THE"], ids["KITCHEN"], ids["LIGHTS"]],
                           len(PIECES))[None]
    lengths = torch.tensor([1.0])
    assert greedy_texts(log_probs, lengths, PIECES) == ["TURN OFF THE KITCHEN LIGHTS"]
    searcher = NgramCTCBeamSearcher(len(PIECES), PIECES, trigram, lm_weight=0.0)
    assert searcher.transcribe(log_probs, lengths) == ["TURN OFF THE KITCHEN LIGHTS"]
    searcher.configure(lm_weight=0.5)
    assert searcher.transcribe(log_probs, lengths) == ["TURN ON THE KITCHEN LIGHTS"]
    # The sentence end counts: "TURN ON THE KITCHEN" alone would be a likely prefix.
    best = searcher.decode_beams(log_probs, lengths)[0][0]
    assert best.last_lm_state == ("KITCHEN", "LIGHTS")


def test_an_lm_the_tokenizer_cannot_spell_is_refused(tokenizer, tmp_path):
    lowercase = train_ngram(write_text(tmp_path / "lower.txt", [s.lower() for s in SENTENCES]),
                            tmp_path / "lower.arpa")
    pieces = pieces_of(tokenizer)
    with pytest.raises(VocabularyMismatchError, match=r"does not match the tokenizer: only 0 "
                       r"of its 17 words can be spelled with the tokenizer's 30 pieces"):
        NgramCTCBeamSearcher(len(pieces), pieces, lowercase)
    with pytest.raises(ValueError, match="no SentencePiece pieces"):
        NgramCTCBeamSearcher(3, ["a", "b", "c"], lowercase)
    searcher = NgramCTCBeamSearcher(len(pieces), pieces, tmp_path / "lower.arpa",
                                    min_spellable_fraction=0.0)
    with pytest.raises(ValueError, match=r"expects \[batch, frames, 31\]"):
        searcher.transcribe(torch.zeros(1, 5, 40).log_softmax(-1))


def test_bad_lm_files_are_refused_with_their_name(trigram, tmp_path):
    good = (tmp_path / "lm.arpa").read_text()
    cases = {
        "missing.arpa": None,
        "binary.arpa": b"mmap lm http://kheafield.com/code format version 5\x00\xff\xfe",
        "empty.arpa": "",
        "truncated.arpa": good[: len(good) // 2],
        "miscounted.arpa": good.replace("ngram 1=", "ngram 1=1", 1),
        # one more unigram, with 10 ** -0.1 = 0.79 of the mass
        "unnormalised.arpa": re.sub(r"ngram 1=(\d+)", lambda m: f"ngram 1={int(m[1]) + 1}",
                                    good.replace("\\1-grams:\n", "\\1-grams:\n-0.1\tEXTRA\n")),
    }
    messages = {
        "missing.arpa": (FileNotFoundError, "no such LM file"),
        "binary.arpa": (ARPAFormatError, "not ARPA text"),
        "empty.arpa": (ARPAFormatError, "not a well-formed ARPA n-gram model"),
        "truncated.arpa": (ARPAFormatError, r"ends before its \\end\\ line"),
        "miscounted.arpa": (ARPAFormatError, "declares 1"),
        "unnormalised.arpa": (ARPAFormatError, "unigram probabilities sum to 1.79, not 1"),
    }
    for name, content in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content)
        error, message = messages[name]
        with pytest.raises(error, match=message) as raised:
            load_ngram(path)
        assert str(path) in str(raised.value)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        load_ngram(tmp_path)
    with pytest.raises(ValueError, match="no words"):
        train_ngram(write_text(tmp_path / "blank.txt", ["", "  "]), tmp_path / "blank.arpa")
