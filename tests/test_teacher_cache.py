"""The teacher cache stores what the teacher says, refuses mismatches, and resumes exactly."""

import pickle
import random

import pytest
import torch

from sb_crossmodal_kd.teachers.base import Teacher
from sb_crossmodal_kd.teachers.cache import CacheMismatchError, TeacherCache, build_cache
from sb_crossmodal_kd.teachers.speechbrain_lm import SpeechBrainLMTeacher
from sb_crossmodal_kd.teachers.unit_lm import UnitLM

VOCAB = 24


def _teacher(unit_type="monophone", tokenizer_hash="lexicon-1"):
    torch.manual_seed(0)
    lm = UnitLM(VOCAB, architecture="lstm", embedding_dim=16, hidden_size=16, num_layers=1,
                dropout=0.0)
    return SpeechBrainLMTeacher(lm, vocab_size=VOCAB, bos_index=1, unit_offset=2,
                                name="unit-lm:test", unit_type=unit_type,
                                tokenizer_hash=tokenizer_hash)


def _utterances(n=23, seed=0):
    rng = random.Random(seed)
    return [
        (f"utt{i:03d}", [rng.randrange(VOCAB) for _ in range(rng.randint(1, 12))])
        for i in range(n)
    ]


def _padded(sequences):
    lengths = torch.tensor([len(s) for s in sequences])
    ids = torch.zeros(len(sequences), int(lengths.max()), dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, : len(s)] = torch.tensor(s)
    return ids, lengths


def test_cached_distributions_equal_fresh_teacher_outputs(tmp_path):
    teacher, utterances = _teacher(), _utterances()
    build_cache(teacher, utterances, tmp_path, k=5, tau=1.5, shard_size=7, batch_size=4,
                progress=False)
    cache = TeacherCache(tmp_path, vocab_size=VOCAB, tokenizer_hash="lexicon-1",
                         unit_type="monophone", temperature=1.5)
    assert len(cache) == len(utterances) and cache.k == 5

    chosen = [utterances[i] for i in (20, 3, 11)]  # across shards, in any order
    ids, lengths = _padded([units for _, units in chosen])
    fresh = teacher.distributions(ids, lengths, k=5, tau=1.5)
    cached = cache.distributions([utt_id for utt_id, _ in chosen], max_len=ids.shape[1])

    assert cached.top_probs.shape == fresh.top_probs.shape
    assert cached.top_probs.dtype == torch.float32 and cached.top_ids.dtype == torch.int64
    mask = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
    # Same ids in the same order (ties aside, which random weights do not produce).
    assert torch.equal(cached.top_ids[mask], fresh.top_ids[mask])
    torch.testing.assert_close(cached.top_probs, fresh.top_probs, atol=1e-3, rtol=1e-3)
    totals = cached.top_probs.sum(-1) + cached.residual
    torch.testing.assert_close(totals[mask], torch.ones(int(mask.sum())), atol=1e-3, rtol=0)
    assert float(totals[~mask].abs().sum()) == 0.0  # padding carries nothing


def test_reading_fewer_than_stored_moves_mass_into_residual(tmp_path):
    teacher, utterances = _teacher(), _utterances(5)
    build_cache(teacher, utterances, tmp_path, k=8, progress=False)
    full, short = TeacherCache(tmp_path), TeacherCache(tmp_path, k=3)
    a, b = full.utterance("utt001"), short.utterance("utt001")
    assert torch.equal(a[1][:, :3], b[1])
    torch.testing.assert_close(b[0].sum(-1) + b[2], a[0].sum(-1) + a[2])
    with pytest.raises(CacheMismatchError, match="top 8"):
        TeacherCache(tmp_path, k=9)


def test_a_vocabulary_smaller_than_k_is_read_whole(tmp_path):
    # A small-vocabulary task: the cache keeps every unit, so a recipe's larger teacher_k
    # reads the whole distribution instead of stopping at construction.
    teacher, utterances = _teacher(), _utterances(5)
    build_cache(teacher, utterances, tmp_path, k=VOCAB + 20, progress=False)
    cache = TeacherCache(tmp_path, k=VOCAB + 20)
    assert cache.stored_k == cache.k == VOCAB
    probs, ids, residual = cache.utterance("utt001")
    assert probs.shape[-1] == VOCAB and float(residual.abs().max()) < 1e-3


def test_mismatched_units_or_settings_are_refused(tmp_path):
    teacher, utterances = _teacher(), _utterances(6)
    build_cache(teacher, utterances, tmp_path, k=4, tau=2.0, progress=False)
    for wrong, setting in (
        ({"vocab_size": VOCAB + 1}, "vocab_size"),
        ({"tokenizer_hash": "lexicon-2"}, "tokenizer_hash"),
        ({"unit_type": "senone"}, "unit_type"),
        ({"temperature": 1.0}, "temperature"),
    ):
        with pytest.raises(CacheMismatchError, match=setting):
            TeacherCache(tmp_path, **wrong)
    # Resuming into the same folder with other settings is refused, not mixed.
    with pytest.raises(CacheMismatchError, match="temperature"):
        build_cache(teacher, utterances, tmp_path, k=4, tau=1.0, progress=False)
    with pytest.raises(CacheMismatchError, match="sequences_hash"):
        build_cache(teacher, utterances[:-1], tmp_path, k=4, tau=2.0, progress=False)
    # Units from another tokenizer than the teacher's.
    with pytest.raises(CacheMismatchError, match="tokenizer hash"):
        build_cache(teacher, utterances, tmp_path / "other", k=4, tokenizer_hash="lexicon-9",
                    progress=False)
    # A batch whose unit sequence is shorter than what the cache holds.
    cache = TeacherCache(tmp_path)
    longest = max(utterances, key=lambda u: len(u[1]))
    with pytest.raises(CacheMismatchError, match=longest[0]):
        cache.distributions([longest[0]], max_len=len(longest[1]) - 1)
    with pytest.raises(KeyError, match="nope"):
        cache.distributions(["nope"])


def test_bad_input_names_the_utterance(tmp_path):
    teacher = _teacher()
    with pytest.raises(ValueError, match="utt-bad.*outside"):
        build_cache(teacher, [("utt-ok", [1, 2]), ("utt-bad", [3, VOCAB])], tmp_path,
                    k=4, progress=False)
    with pytest.raises(ValueError, match="utt-empty"):
        build_cache(teacher, [("utt-empty", [])], tmp_path / "b", k=4, progress=False)


class Interrupted(Exception):
    """Stands for a kill in the middle of a build."""


class InterruptAfter(Teacher):
    """Delegates to a real teacher, then fails after ``calls`` batches (a crash mid-build)."""

    def __init__(self, inner, calls):
        super().__init__(inner.vocab_size, inner.name, inner.context, inner.unit_type,
                         inner.tokenizer_hash)
        self.inner, self.calls, self.seen = inner, calls, 0

    def unit_logits(self, unit_ids, lengths):
        if self.seen >= self.calls:
            raise Interrupted
        self.seen += 1
        return self.inner.unit_logits(unit_ids, lengths)


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_interrupted_then_resumed_build_is_byte_identical(tmp_path):
    teacher, utterances = _teacher(), _utterances(23)
    settings = {"k": 6, "tau": 1.0, "shard_size": 5, "batch_size": 2, "progress": False}
    build_cache(teacher, utterances, tmp_path / "straight", **settings)

    resumed = tmp_path / "resumed"
    # 5 shards of 5 utterances = 3 batches each: dies inside the third shard.
    with pytest.raises(Interrupted):
        build_cache(InterruptAfter(teacher, calls=7), utterances, resumed, **settings)
    with pytest.raises(CacheMismatchError, match="incomplete"):
        TeacherCache(resumed)
    (resumed / ".tmp-shard_00002.bin.leftover").write_bytes(b"partial")  # a torn write

    counting = InterruptAfter(teacher, calls=10**9)
    build_cache(counting, utterances, resumed, **settings)
    assert counting.seen == 3 + 3 + 2  # shards 0 and 1 were not recomputed
    assert _files(resumed) == _files(tmp_path / "straight")
    assert TeacherCache(resumed).header["complete"]


def test_cache_pickles_for_dataloader_workers(tmp_path):
    teacher, utterances = _teacher(), _utterances(4)
    build_cache(teacher, utterances, tmp_path, k=4, progress=False)
    cache = TeacherCache(tmp_path)
    before = cache.utterance("utt002")
    clone = pickle.loads(pickle.dumps(cache))
    after = clone.utterance("utt002")
    assert all(torch.equal(x, y) for x, y in zip(before, after, strict=True))


def test_sbkd_teacher_cache_builds_from_a_manifest(tmp_path, capsys):
    from sb_crossmodal_kd.cli import main
    from sb_crossmodal_kd.teachers.unit_lm import export_unit_lm
    from sb_crossmodal_kd.units.lexicon import Lexicon
    from sb_crossmodal_kd.units.types import TextUnits

    manifest = tmp_path / "train.csv"
    manifest.write_text(
        "ID,duration,wav,spk_id,wrd\n"
        "a1,1.0,/x/a1.wav,s1,turn on the lights\n"
        "a2,1.0,/x/a2.wav,s1,zzzqx the lights\n"  # OOV under the skip policy
        "a3,1.0,/x/a3.wav,s2,set a timer\n"
    )
    monophones = TextUnits("monophone", lexicon=Lexicon.from_cmudict(oov_policy="skip"))
    torch.manual_seed(0)
    lm = UnitLM(monophones.vocab_size, embedding_dim=8, hidden_size=8, num_layers=1)
    export_unit_lm(tmp_path / "lm", lm, unit_type="monophone", tokenizer_hash=monophones.hash)

    main(["teacher-cache", "--manifest", str(manifest), "--units", "monophone",
          "--oov-policy", "skip", "--teacher", str(tmp_path / "lm"),
          "--output", str(tmp_path / "cache"), "--k", "4"])
    assert '"skipped": 1' in capsys.readouterr().out
    cache = TeacherCache(tmp_path / "cache", vocab_size=40, tokenizer_hash=monophones.hash)
    assert sorted(cache.index) == ["a1", "a3"]
    assert cache.length("a1") == len(monophones("turn on the lights"))

    # Units made otherwise than the teacher's (here: with silences) are refused.
    with pytest.raises(CacheMismatchError, match="tokenizer hash"):
        main(["teacher-cache", "--manifest", str(manifest), "--units", "monophone",
              "--oov-policy", "skip", "--silence", "edges", "--teacher", str(tmp_path / "lm"),
              "--output", str(tmp_path / "cache2"), "--k", "4"])


def test_sbkd_teacher_cache_reads_the_unit_store_sequences(tmp_path, capsys):
    import numpy as np

    from sb_crossmodal_kd.cli import main
    from sb_crossmodal_kd.teachers.unit_lm import export_unit_lm
    from sb_crossmodal_kd.units.store import UnitStoreWriter
    from sb_crossmodal_kd.units.types import units_hash

    header = {"lexicon": "cmudict:aa", "tokenizer": "spm:bb", "tree": "tree:cc"}
    with UnitStoreWriter(tmp_path / "train.units", header) as writer:
        writer.add("u1", {"senone.units": np.array([3, 4, 5, 9]), "monophone.units": [1, 2]})
        writer.add("u2", {"senone.units": np.array([7, 8]), "monophone.units": [3]})
    torch.manual_seed(0)
    export_unit_lm(tmp_path / "lm", UnitLM(VOCAB, embedding_dim=8, hidden_size=8, num_layers=1),
                   unit_type="senone", tokenizer_hash="cmudict:aa/tree:cc")
    assert units_hash("senone", lexicon="cmudict:aa", tree="tree:cc") == "cmudict:aa/tree:cc"

    main(["teacher-cache", "--units-store", str(tmp_path / "train.units"), "--units", "senone",
          "--teacher", str(tmp_path / "lm"), "--output", str(tmp_path / "cache"), "--k", "3"])
    capsys.readouterr()
    cache = TeacherCache(tmp_path / "cache", tokenizer_hash="cmudict:aa/tree:cc")
    assert (cache.length("u1"), cache.length("u2")) == (4, 2)

    # A teacher trained with another tree is refused.
    export_unit_lm(tmp_path / "lm2", UnitLM(VOCAB, embedding_dim=8, hidden_size=8, num_layers=1),
                   unit_type="senone", tokenizer_hash="cmudict:aa/tree:zz")
    with pytest.raises(CacheMismatchError, match="tree:zz"):
        main(["teacher-cache", "--units-store", str(tmp_path / "train.units"), "--units",
              "senone", "--teacher", str(tmp_path / "lm2"), "--output", str(tmp_path / "c2")])


def test_statistics_measure_the_teachers_entropy(tmp_path):
    """With every unit kept, the mean entropy is the fresh teacher's exactly; a hotter teacher
    is further from one-hot."""
    teacher, utterances = _teacher(), _utterances(9)
    build_cache(teacher, utterances, tmp_path / "all", k=VOCAB, progress=False)
    stats = TeacherCache(tmp_path / "all").statistics()
    ids, lengths = _padded([units for _, units in utterances])
    probs = teacher.distributions(ids, lengths, k=VOCAB).top_probs
    mask = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
    p = probs[mask]
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
    assert stats["n_positions"] == int(lengths.sum())
    assert stats["mean_entropy"] == pytest.approx(float(entropy), abs=2e-3)
    assert stats["mean_top1"] == pytest.approx(float(p.max(-1).values.mean()), abs=2e-3)
    build_cache(teacher, utterances, tmp_path / "hot", k=4, tau=3.0, progress=False)
    hot = TeacherCache(tmp_path / "hot").statistics()
    assert hot["mean_entropy"] > stats["mean_entropy"] and hot["mean_top1"] < stats["mean_top1"]
