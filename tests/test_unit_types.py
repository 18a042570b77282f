"""The unit-type registry: one definition per unit type, read by the store, the datasets, the
Brain and the command line; adding a unit type is one class and one yaml fragment."""

import csv
import json
import re

import numpy as np
import pytest
import soundfile

from sb_crossmodal_kd.alignment.framerate import FrameRate
from sb_crossmodal_kd.alignment.units import subword_frame_positions
from sb_crossmodal_kd.data.corpus import make_corpus
from sb_crossmodal_kd.experiment import run_asr_experiment
from sb_crossmodal_kd.hparams import KD_CONDITIONS
from sb_crossmodal_kd.units.phones import PHONES, SILENCE
from sb_crossmodal_kd.units.store import UnitStore, UnitStoreWriter
from sb_crossmodal_kd.units.types import (
    AlignedUtterance,
    TextUnits,
    UnitResources,
    UnitType,
    register_unit_type,
    unit_streams,
    unit_type,
    unregister_unit_type,
)

ALPHABET = "abcdefghijklmnopqrstuvwxyz'"


class CharacterUnits(UnitType):
    """Letters: each word's aligned span shared out over its letters; no LM."""

    name = "character"

    def vocab_size(self, resources):
        return len(ALPHABET)

    def text_to_ids(self, text, resources, utterance_id=None):
        return [ALPHABET.index(c) for c in text if c != " "]

    def streams(self, alignment, resources):
        text = alignment.text
        spans = [(i, i + 1) for i, c in enumerate(text) if c != " "]
        positions = subword_frame_positions(text, alignment.word_times, spans,
                                            alignment.n_frames,
                                            alignment.frame_rate.encoder_shift_s)
        ids = np.asarray(self.text_to_ids(text, resources), dtype=np.int32)
        labels = np.where(positions >= 0, ids[np.maximum(positions, 0)], -1)
        return {"units": ids, "frame_to_position": positions, "frame_labels": labels}


@pytest.fixture
def characters():
    unit = register_unit_type(CharacterUnits())
    yield unit
    unregister_unit_type(unit.name)


def _phone_alignment(entry, n_samples, frame_rate, text):
    """A AlignedUtterance from a corpus's reference timings (phones and words in seconds)."""
    phones = [(p, s, e) for p, s, e in entry["phones"] if p != SILENCE]
    positions = np.full(frame_rate.feature_frames(n_samples), -1, dtype=np.int64)
    for k, (_, start, end) in enumerate(phones):
        positions[int(round(start * 100)):int(round(end * 100))] = k
    return AlignedUtterance([PHONES.index(p) for p, _, _ in phones], positions,
                          frame_rate.frames_for_samples(n_samples), frame_rate, text=text,
                          word_times=[tuple(w) for w in entry["words"]])


def test_unknown_unit_types_are_refused_naming_the_registered_ones():
    with pytest.raises(KeyError, match=r"'phones'.*\['subword', 'monophone', 'senone'\]"):
        unit_type("phones")
    with pytest.raises(ValueError, match="unknown unit type 'char'"):
        TextUnits("char")
    with pytest.raises(ValueError, match="needs tree"):
        TextUnits("senone", lexicon=object())


def test_a_store_written_with_the_former_stream_names_is_read_under_the_unit_type_names(
        tmp_path):
    path = tmp_path / "old.units"
    with UnitStoreWriter(path, {"lexicon": "l", "tokenizer": "t", "tree": "r"}) as writer:
        writer.add("u", {"phones.units": [3, 4], "senones.frame_labels": [0, 1, 2],
                         "subwords.frame_to_position": [-1, 0], "feature_positions": [0]})
    record = UnitStore(path)["u"]
    assert sorted(record) == ["feature_positions", "monophone.units", "senone.frame_labels",
                              "subword.frame_to_position"]
    assert record["monophone.units"].tolist() == [3, 4]


def test_a_registered_character_unit_type_trains_one_epoch_with_a_character_head(
        characters, tmp_path):
    data = tmp_path / "data"
    make_corpus(data, progress=False, n_train=12, n_valid=2, n_test=2, n_text=20,
                n_text_valid=5, speakers=(3, 1, 1), seed=7)
    alignments = json.loads((data / "train_alignments.json").read_text())
    frame_rate = FrameRate()
    prep = tmp_path / "prep"
    (prep / "units").mkdir(parents=True)
    (prep / "senone_tree.json").write_text('{"num_senones": 9}')  # read by base.yaml only
    with UnitStoreWriter(prep / "units" / "train.units",
                         {"lexicon": "l", "tokenizer": None, "tree": None}) as writer:
        with open(data / "train.csv", encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
        # eSpeak's word events sometimes merge two words: keep the rows whose timings have
        # one entry per word, as an aligner's would.
        rows = [r for r in rows if len(alignments[r["ID"]]["words"]) == len(r["wrd"].split())]
        assert len(rows) >= 6
        for row in rows:
            n_samples = soundfile.info(row["wav"]).frames
            alignment = _phone_alignment(alignments[row["ID"]], n_samples, frame_rate,
                                         row["wrd"])
            # No tokenizer, no tree: the registry gives monophones and the new characters.
            writer.add(row["ID"], unit_streams(alignment, UnitResources()))
    record = UnitStore(prep / "units" / "train.units")[row["ID"]]
    assert {"monophone.units", "character.units", "character.frame_to_position"} <= set(record)
    assert record["character.units"].tolist() == characters.text_to_ids(row["wrd"], None)
    positions = record["character.frame_to_position"]
    assert set(positions[positions >= 0].tolist()) == set(range(len(record["character.units"])))

    # The condition: base.yaml's heads replaced by one character head (the yaml fragment).
    condition = tmp_path / "character_head.yaml"
    condition.write_text(f"""
experiment: !include:{KD_CONDITIONS / "base.yaml"}
    condition: character_head
    heads:
        senone_head: null
        monophone_head: null
        subword_head: null
        more_heads:
            character: !new:sb_crossmodal_kd.nnet.heads.AuxiliaryHead
                unit_type: character
                layer: 2
                input_size: 32
                n_units: {len(ALPHABET)}
                loss: frame_ce
                loss_weight: 0.5
                alpha: 0.0
""")
    out = tmp_path / "run"
    results = run_asr_experiment(condition, {
        "data_folder": str(data), "prep_folder": str(prep), "output_folder": str(out),
        "vocab_size": 32, "number_of_epochs": 1, "d_model": 32, "num_layers": 3, "nhead": 2,
        "d_ffn": 64, "warmup_steps": 5, "max_batch_seconds": 30, "num_workers": 0,
        "dynamic_batch_sampler": {"num_buckets": 4},
        "valid_dataloader_opts": {"batch_size": 8}, "test_dataloader_opts": {"batch_size": 8}})
    assert results["epochs"] == 1 and results["params_with_heads"] > results["params"]
    line = (out / "train_log.txt").read_text().splitlines()[0]
    terms = dict(re.findall(r"train loss_(\w+): ([0-9.e+-]+)", line))
    assert set(terms) == {"main", "total", "frame_ce_character"}
    assert float(terms["frame_ce_character"]) > 0
    assert re.search(r"acc_character: [0-9.]+", line)
