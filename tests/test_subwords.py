"""Subword units: SentencePiece via SpeechBrain and a local transformers tokenizer."""

import csv

import pytest

from sb_crossmodal_kd.units.subwords import PretrainedTokenizerUnits, SentencePieceUnits

SENTENCES = [
    "turn on the kitchen lights",
    "turn off the oven in the kitchen",
    "book a table for four people at seven",
    "set an alarm for six thirty",
    "dim the bedroom lights",
] * 10


def _write_csv(path, sentences):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ID", "duration", "wav", "spk_id", "wrd"])
        for i, s in enumerate(sentences):
            writer.writerow([f"utt{i}", 1.0, f"/x/{i}.wav", "s", s])


def test_sentencepiece_from_csv_round_trips_and_hash_is_stable(tmp_path):
    _write_csv(tmp_path / "train.csv", SENTENCES)
    units = SentencePieceUnits(str(tmp_path / "tok"), 30, csv_file=str(tmp_path / "train.csv"))
    assert units.vocab_size == 30
    for s in set(SENTENCES):
        ids = units.encode(s)
        assert all(0 <= i < 30 for i in ids)
        assert units.decode(ids) == s
    # Loading the same folder gives the same model and hash; a different model a different hash.
    again = SentencePieceUnits(str(tmp_path / "tok"), 30)
    assert again.hash == units.hash and again.encode(SENTENCES[0]) == units.encode(SENTENCES[0])
    other = SentencePieceUnits(str(tmp_path / "tok"), 25, csv_file=str(tmp_path / "train.csv"))
    assert other.hash != units.hash


def test_sentencepiece_without_data_or_model_says_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="pass csv_file or text_file"):
        SentencePieceUnits(str(tmp_path / "none"), 40)


def test_a_damaged_sentencepiece_model_is_named_not_retrained_over(tmp_path):
    _write_csv(tmp_path / "train.csv", SENTENCES)
    SentencePieceUnits(str(tmp_path / "tok"), 30, csv_file=str(tmp_path / "train.csv"))
    model = tmp_path / "tok" / "30_unigram.model"
    damaged = model.read_bytes()[: model.stat().st_size // 2]  # a copy cut short
    model.write_bytes(damaged)
    for data in ({}, {"csv_file": str(tmp_path / "train.csv")}):
        with pytest.raises(ValueError, match=f"{model}.*truncated or damaged"):
            SentencePieceUnits(str(tmp_path / "tok"), 30, **data)
    assert model.read_bytes() == damaged  # left for the user to restore or delete


def test_local_transformers_tokenizer(tmp_path):
    pytest.importorskip("transformers")  # the [hf] extra
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    fast.save_pretrained(str(tmp_path / "hf"))

    units = PretrainedTokenizerUnits(str(tmp_path / "hf"))
    ids = units.encode("turn on the kitchen lights")
    assert ids == fast.encode("turn on the kitchen lights", add_special_tokens=False)
    assert units.decode(ids).replace(" ", "") == "turnonthekitchenlights"
    assert units.vocab_size == len(fast)
    assert units.hash.startswith("hf:")
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        PretrainedTokenizerUnits(str(tmp_path / "missing"))


def test_transformers_tokenizers_without_the_hf_extra_name_it(tmp_path, monkeypatch):
    import sys

    from sb_crossmodal_kd.units.subwords import PretrainedTokenizerUnits

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'sb-crossmodal-kd\[hf\]'"):
        PretrainedTokenizerUnits(str(tmp_path))
