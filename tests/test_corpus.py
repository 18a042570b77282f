"""The embedded corpus: deterministic, disjoint, loadable, and safe to re-run."""

import csv
import hashlib
import json

import pytest
import speechbrain as sb

from sb_crossmodal_kd.data.corpus import make_corpus
from sb_crossmodal_kd.units.phones import PHONES

TINY = {"n_train": 12, "n_valid": 4, "n_test": 4, "n_text": 300, "n_text_valid": 30,
        "speakers": (3, 1, 2), "seed": 7}


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _digest(folder):
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != "corpus.json":
            h.update(path.relative_to(folder).as_posix().encode())
            data = path.read_bytes().replace(str(folder).encode(), b"")
            h.update(data)
    return h.hexdigest()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    make_corpus(folder, progress=False, **TINY)
    return folder


def test_same_seed_gives_identical_corpus(corpus, tmp_path):
    make_corpus(tmp_path / "again", progress=False, **TINY)
    assert _digest(corpus) == _digest(tmp_path / "again")


def test_parallel_synthesis_gives_the_same_corpus(corpus, tmp_path):
    # jobs is not a setting of the corpus: two processes must write the same bytes as one.
    make_corpus(tmp_path / "two_jobs", progress=False, jobs=2, **TINY)
    assert _digest(corpus) == _digest(tmp_path / "two_jobs")


def test_other_seed_gives_other_corpus(corpus, tmp_path):
    make_corpus(tmp_path / "other", progress=False, **{**TINY, "seed": 8})
    assert _digest(corpus) != _digest(tmp_path / "other")


def test_splits_disjoint_in_sentences_and_speakers(corpus):
    rows = {s: _rows(corpus / f"{s}.csv") for s in ("train", "valid", "test")}
    assert [len(rows[s]) for s in rows] == [12, 4, 4]
    voices = {
        s: {a["voice"] for a in json.loads((corpus / f"{s}_alignments.json").read_text()).values()}
        for s in rows
    }
    sentences = {s: {r["wrd"] for r in rows[s]} for s in rows}
    lm_text = set((corpus / "lm_text" / "train.txt").read_text().splitlines())
    lm_text |= set((corpus / "lm_text" / "valid.txt").read_text().splitlines())
    assert len(lm_text) == 330
    for a in rows:
        assert not sentences[a] & lm_text
        for b in rows:
            if a < b:
                assert not sentences[a] & sentences[b]
                assert not voices[a] & voices[b]
    # Valid and test speak with base voices (accents) that no train speaker has.
    base = {s: {v.split("+")[0] for v in voices[s]} for s in rows}
    assert len(base["valid"]) == len(base["test"]) == 1
    assert not base["train"] & (base["valid"] | base["test"])
    assert base["valid"] != base["test"]


def test_alignments_cover_audio_with_known_phones(corpus):
    rows = {r["ID"]: r for r in _rows(corpus / "test.csv")}
    alignments = json.loads((corpus / "test_alignments.json").read_text())
    for utt, ali in alignments.items():
        phones = ali["phones"]
        assert {p for p, _, _ in phones} <= set(PHONES)
        assert phones[0][1] == 0.0
        assert abs(phones[-1][2] - float(rows[utt]["duration"])) < 0.01
        for (_, _, end), (_, start, _) in zip(phones, phones[1:], strict=False):
            assert abs(end - start) < 1e-3  # contiguous segments
        assert " ".join(w for w, _, _ in ali["words"]) == rows[utt]["wrd"]
        starts = [s for _, s, _ in ali["words"]]
        assert starts == sorted(starts)


def test_manifest_loads_in_dynamic_item_dataset(corpus):
    dataset = sb.dataio.dataset.DynamicItemDataset.from_csv(corpus / "train.csv")

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio(wav):
        return sb.dataio.dataio.read_audio(wav)

    dataset.add_dynamic_item(audio)
    dataset.set_output_keys(["id", "sig", "wrd", "duration"])
    item = dataset[0]
    assert item["sig"].ndim == 1
    assert abs(len(item["sig"]) / 16000 - item["duration"]) < 1e-3
    assert item["wrd"]


def test_rerun_skips_and_other_settings_are_refused(corpus):
    before = {p: p.stat().st_mtime_ns for p in corpus.rglob("*") if p.is_file()}
    make_corpus(corpus, progress=False, **TINY)
    after = {p: p.stat().st_mtime_ns for p in corpus.rglob("*") if p.is_file()}
    assert {p: t for p, t in after.items() if p.name != "corpus.json"} == {
        p: t for p, t in before.items() if p.name != "corpus.json"
    }
    with pytest.raises(FileExistsError, match="n_train"):
        make_corpus(corpus, progress=False, **{**TINY, "n_train": 13})


def test_incomplete_split_is_rebuilt(tmp_path):
    make_corpus(tmp_path, progress=False, **TINY)
    reference = (tmp_path / "test.csv").read_text()
    (tmp_path / "test.csv").unlink()
    make_corpus(tmp_path, progress=False, **TINY)
    assert (tmp_path / "test.csv").read_text() == reference


def test_foreign_folder_is_not_touched(tmp_path):
    (tmp_path / "train.csv").write_text("mine")
    with pytest.raises(FileExistsError, match="not made by"):
        make_corpus(tmp_path, progress=False, **TINY)
    assert (tmp_path / "train.csv").read_text() == "mine"
