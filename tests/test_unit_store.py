"""Unit store and pipelines: round trip, refused mismatches, length checks, unit streams."""

import numpy as np
import pytest
import soundfile
import speechbrain as sb
import torch

from sb_crossmodal_kd.alignment.framerate import AlignmentLengthError, FrameRate
from sb_crossmodal_kd.units.lexicon import Lexicon
from sb_crossmodal_kd.units.phones import PHONES
from sb_crossmodal_kd.units.pipeline import add_unit_pipelines, unit_collate
from sb_crossmodal_kd.units.senones import SenoneTree, TriphoneStats
from sb_crossmodal_kd.units.store import UnitStore, UnitStoreMismatchError, UnitStoreWriter
from sb_crossmodal_kd.units.subwords import SentencePieceUnits
from sb_crossmodal_kd.units.types import AlignedUtterance, UnitResources
from sb_crossmodal_kd.units.types import unit_streams as registry_streams

LEXICON = {
    "turn": [["T", "ER1", "N"]], "on": [["AA1", "N"]], "the": [["DH", "AH0"]],
    "lights": [["L", "AY1", "T", "S"]], "off": [["AO1", "F"]], "oven": [["AH1", "V", "AH0", "N"]],
}
TEXTS = ["turn on the lights", "turn off the oven", "turn the lights off", "turn on the oven"]


@pytest.fixture(scope="module")
def units(tmp_path_factory):
    folder = tmp_path_factory.mktemp("units")
    (folder / "text.txt").write_text("\n".join(TEXTS * 10) + "\n")
    tokenizer = SentencePieceUnits(str(folder / "spm"), 20, text_file=str(folder / "text.txt"))
    lexicon = Lexicon(LEXICON)
    gen = torch.Generator().manual_seed(0)
    stats = TriphoneStats(dim=3)
    for text in TEXTS:
        phones = lexicon.phones(text)
        labels = np.repeat(np.arange(len(phones)), 6)
        stats.add(phones, labels, torch.randn(len(labels), 3, generator=gen))
    tree = SenoneTree.build(stats, max_leaves=300, min_count=5, min_gain=5.0)
    return folder, lexicon, tokenizer, tree


def _utterance(lexicon, text, seconds=1.0):
    """A plausible 10 ms alignment: 0.1 s silence, phones evenly over the speech, silence."""
    rate = FrameRate()
    phones = lexicon.phone_ids(text)
    n_feat = rate.feature_frames(int(seconds * rate.sample_rate))
    positions = np.full(n_feat, -1)
    bounds = np.linspace(10, n_feat - 10, len(phones) + 1).round().astype(int)
    words, k = [], 0
    for w in text.split():
        n = len(lexicon.pronounce(w))
        words.append((w, bounds[k] * 0.01, bounds[k + n] * 0.01))
        k += n
    for k in range(len(phones)):
        positions[bounds[k] : bounds[k + 1]] = k
    return phones, positions, words


def _header(lexicon, tokenizer, tree):
    return {"lexicon": lexicon.hash, "tokenizer": tokenizer.hash, "tree": tree.hash}



def unit_streams(phones, positions, n_frames, rate, tree, tokenizer, text, words):
    """Every unit type's streams of one utterance, from its phone alignment."""
    alignment = AlignedUtterance(phones, positions, n_frames, rate, text=text, word_times=words)
    return registry_streams(alignment, UnitResources(tokenizer=tokenizer, tree=tree))


def test_unit_streams_are_consistent(units):
    _, lexicon, tokenizer, tree = units
    rate = FrameRate()
    phones, positions, words = _utterance(lexicon, TEXTS[0])
    n_enc = rate.frames_for_samples(16000)
    s = unit_streams(phones, positions, n_enc, rate, tree, tokenizer, TEXTS[0], words)
    for unit in ("monophone", "senone", "subword"):
        f2p = s[f"{unit}.frame_to_position"]
        assert len(f2p) == n_enc and len(s[f"{unit}.frame_labels"]) == n_enc
        assert f2p.max() < len(s[f"{unit}.units"]) and f2p.min() >= -1
        inside = f2p >= 0
        # Positions move forward in time, and labels are the units at those positions.
        assert (np.diff(f2p[inside]) >= 0).all()
        assert (s[f"{unit}.frame_labels"][inside] == s[f"{unit}.units"][f2p[inside]]).all()
    assert s["monophone.units"].tolist() == lexicon.phone_ids(TEXTS[0])
    assert s["senone.units"].tolist() == tree.senones(lexicon.phones(TEXTS[0]))
    assert s["subword.units"].tolist() == tokenizer.encode(TEXTS[0])
    # Silence frames: no phone position, the silence phone and silence-state senones.
    assert s["monophone.frame_to_position"][0] == -1 and s["monophone.frame_labels"][0] == 0
    assert s["senone.frame_labels"][0] in (0, 1, 2)
    assert s["subword.frame_to_position"][0] == -1
    # Every subword of a word is reached by some frame (the words are long enough).
    assert set(s["subword.frame_to_position"][s["subword.frame_to_position"] >= 0]) == set(
        range(len(s["subword.units"]))
    )


def test_store_round_trip_and_mismatch_refused(units, tmp_path):
    folder, lexicon, tokenizer, tree = units
    rate = FrameRate()
    path = tmp_path / "train.units"
    records = {}
    with UnitStoreWriter(path, _header(lexicon, tokenizer, tree)) as writer:
        for i, text in enumerate(TEXTS):
            phones, positions, words = _utterance(lexicon, text)
            records[f"u{i}"] = unit_streams(
                phones, positions, rate.frames_for_samples(16000), rate, tree, tokenizer, text,
                words,
            )
            writer.add(f"u{i}", records[f"u{i}"])
    store = UnitStore(path, expect=_header(lexicon, tokenizer, tree))
    assert store.ids() == ["u0", "u1", "u2", "u3"]
    for utt, streams in records.items():
        got = store[utt]
        assert set(got) == set(streams)
        for name in streams:
            assert got[name].tolist() == streams[name].tolist()
    with pytest.raises(KeyError, match="'nope'"):
        store["nope"]

    other_lexicon = Lexicon(dict(LEXICON, on=[["AO1", "N"]]))
    with pytest.raises(UnitStoreMismatchError, match="lexicon"):
        UnitStore(path, expect=_header(other_lexicon, tokenizer, tree))
    other_tok = SentencePieceUnits(str(folder / "spm"), 18, text_file=str(folder / "text.txt"))
    with pytest.raises(UnitStoreMismatchError, match="tokenizer 'spm:"):
        UnitStore(path, expect=_header(lexicon, other_tok, tree))
    stats = TriphoneStats(dim=3)
    stats.add(["T", "ER"], [0, 0, 0, 1, 1, 1], np.zeros((6, 3)))
    other_tree = SenoneTree.build(stats, max_leaves=200)
    with pytest.raises(UnitStoreMismatchError, match="tree 'tree:") as info:
        UnitStore(path, expect=_header(lexicon, tokenizer, other_tree))
    assert "built with lexicon" not in str(info.value)  # only the real mismatch is named


def test_pipeline_pads_with_minus_one_and_refuses_wrong_lengths(units, tmp_path):
    _, lexicon, tokenizer, tree = units
    rate = FrameRate()
    data, seconds = {}, {"a": 1.0, "b": 0.6, "bad": 0.5}
    path = tmp_path / "valid.units"
    with UnitStoreWriter(path, _header(lexicon, tokenizer, tree)) as writer:
        for utt, dur in seconds.items():
            wav = tmp_path / f"{utt}.wav"
            n = int(dur * 16000)
            soundfile.write(wav, np.zeros(n), 16000)
            data[utt] = {"wav": str(wav)}
            text = TEXTS[1]
            phones, positions, words = _utterance(lexicon, text, seconds=dur)
            # "bad" claims 1.0 s of alignment for 0.5 s of audio.
            n_enc = rate.frames_for_samples(16000 if utt == "bad" else n)
            writer.add(utt, unit_streams(phones, positions, n_enc, rate, tree, tokenizer, text, words))
    dataset = sb.dataio.dataset.DynamicItemDataset(data)
    add_unit_pipelines([dataset], [path], expect=_header(lexicon, tokenizer, tree))
    dataset.set_output_keys(["id", "monophone_units", "monophone_frame_to_position",
                             "senone_frame_labels", "subword_frame_to_position"])
    batch = unit_collate(["monophone", "senone", "subword"])([dataset[0], dataset[1]])
    n_a, n_b = rate.frames_for_samples(16000), rate.frames_for_samples(9600)
    f2p = batch.monophone_frame_to_position.data
    assert f2p.shape == (2, n_a)
    assert (f2p[1, n_b:] == -1).all() and (f2p[1, :n_b] >= 0).any()
    assert batch.monophone_units.data[0].tolist() == lexicon.phone_ids(TEXTS[1])
    assert (batch.subword_frame_to_position.data[1, n_b:] == -1).all()
    with pytest.raises(AlignmentLengthError, match="'bad'.*26 frames.*has 13 \\(longer by 13"):
        dataset[2]
    with pytest.raises(UnitStoreMismatchError, match="lexicon"):
        add_unit_pipelines([dataset], [path], expect={"lexicon": "cmudict:x"})
    assert PHONES[batch.monophone_units.data[0][0]] == "T"


def _v1_store(path, header, records):
    """A store in the first layout (SBKDUNITS1: header and index before the arrays)."""
    import json
    import struct

    index, offset = {}, 0
    for utt, arrays in records.items():
        index[utt] = {}
        for name, array in arrays.items():
            index[utt][name] = [offset, len(array)]
            offset += len(array)
    blob = json.dumps(dict(header, index=index)).encode()
    with open(path, "wb") as f:
        f.write(b"SBKDUNITS1" + struct.pack("<Q", len(blob)) + blob)
        for arrays in records.values():
            for array in arrays.values():
                f.write(np.asarray(array, dtype="<i4").tobytes())


def test_store_is_written_as_records_come_and_reads_the_first_layout(tmp_path):
    import json

    header = {"lexicon": "l", "tokenizer": "t", "tree": "r", "meta": {"mode": "majority"}}
    # 20 kB per record: more than a file buffer holds back.
    records = {f"u{i}": {"monophone.units": np.arange(5000 + i),
                         "monophone.frame_to_position": np.full(3 * i + 2, i - 1)}
               for i in range(5)}
    path = tmp_path / "new.units"
    with UnitStoreWriter(path, header) as writer:
        for n, (utt, streams) in enumerate(records.items()):
            writer.add(utt, streams)
            # Each record is on disk once added (temporary file next to the store).
            written = sum(p.stat().st_size for p in tmp_path.glob(".new.units.*.tmp"))
            assert written >= 20000 * n
        assert not path.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["new.units"]  # no temporary file left
    old = tmp_path / "old.units"
    _v1_store(old, {**header}, records)
    stores = [UnitStore(path, expect=header), UnitStore(old, expect=header)]
    for store in stores:
        assert store.ids() == list(records) and store.header["meta"] == header["meta"]
        for utt, streams in records.items():
            assert {k: v.tolist() for k, v in store[utt].items()} == {
                k: v.tolist() for k, v in streams.items()}
    # The header written piece by piece is the JSON the whole header would be.
    blob = path.read_bytes()
    footer = blob[-26:-10]
    start, length = int.from_bytes(footer[:8], "little"), int.from_bytes(footer[8:], "little")
    assert json.loads(blob[start:start + length]) == json.loads(old.read_bytes()[18:18 + length])
    # A writer left by an exception writes nothing.
    with pytest.raises(RuntimeError), UnitStoreWriter(tmp_path / "bad.units", header) as writer:
        writer.add("u0", records["u0"])
        raise RuntimeError("stop")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.units", "old.units"]
    # A truncated store is named, not read.
    (tmp_path / "cut.units").write_bytes(blob[:-3])
    with pytest.raises(ValueError, match="incomplete unit store"):
        UnitStore(tmp_path / "cut.units")
