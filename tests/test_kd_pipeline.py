"""The KD recipe's data hook (``pipeline.add_kd_items``) on a small hand-made prep folder:
every condition trains on the utterances the unit store holds, a teacher cache is opened
only where a head distils, a head's temperature must be its cache's, and the chain builds
each cache at its prep setting ``teacher_tau``."""

import csv
import logging
import re
import shutil

import pytest
import soundfile
import torch

from sb_crossmodal_kd.alignment.framerate import FrameRate
from sb_crossmodal_kd.data.corpus import make_corpus
from sb_crossmodal_kd.experiment import asr_datasets, load_hparams, run_asr_experiment
from sb_crossmodal_kd.hparams import KD_CONDITIONS
from sb_crossmodal_kd.teachers.base import Teacher
from sb_crossmodal_kd.teachers.cache import CacheMismatchError, TeacherCache, build_cache
from sb_crossmodal_kd.units.store import UnitStore, UnitStoreWriter

KD_HPARAMS = KD_CONDITIONS
VOCAB, N_MONOPHONES, N_SENONES = 32, 40, 9
SIZES = {"subword": VOCAB, "monophone": N_MONOPHONES, "senone": N_SENONES}
# base.yaml at a size that trains one epoch in seconds
TINY = {
    "vocab_size": VOCAB, "number_of_epochs": 1, "d_model": 32, "num_layers": 3, "nhead": 2,
    "d_ffn": 64, "warmup_steps": 5, "max_batch_seconds": 30, "teacher_k": 8,
    "num_workers": 0, "dynamic_batch_sampler": {"num_buckets": 4},
    "valid_dataloader_opts": {"batch_size": 8}, "test_dataloader_opts": {"batch_size": 8},
}


class ShiftTeacher(Teacher):
    """A deterministic toy LM: prefers unit (previous + 1), with some spread."""

    def unit_logits(self, unit_ids, lengths):
        previous = torch.cat([unit_ids[:, :1] * 0, unit_ids[:, :-1]], 1)
        target = torch.nn.functional.one_hot((previous + 1) % self.vocab_size, self.vocab_size)
        return 2.0 * target.float() + 0.1 * torch.arange(self.vocab_size).float()


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    """``(data_folder, prep_folder, dropped_id)``: a SynthCommands corpus and a prep folder
    laid out as pipeline.prepare_kd_data writes it (random units aligned to the audio,
    toy teachers' caches at temperature 1), whose unit store lacks one train utterance."""
    root = tmp_path_factory.mktemp("kd_prep")
    data = root / "data"
    make_corpus(data, progress=False, n_train=20, n_valid=2, n_test=2, n_text=20,
                n_text_valid=5, speakers=(3, 1, 1), seed=7)
    with open(data / "train.csv", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    dropped = rows[5]["ID"]  # as if the aligner had refused it
    folder = root / "prep"
    (folder / "units").mkdir(parents=True)
    (folder / "senone_tree.json").write_text(f'{{"num_senones": {N_SENONES}}}')
    gen = torch.Generator().manual_seed(0)
    rate = FrameRate()
    sequences = {unit: [] for unit in SIZES}
    header = {"lexicon": "l", "tokenizer": "t", "tree": "r"}
    with UnitStoreWriter(folder / "units" / "train.units", header) as writer:
        for row in rows:
            if row["ID"] == dropped:
                continue
            frames = rate.frames_for_samples(soundfile.info(row["wav"]).frames)
            streams = {}
            for unit, size in SIZES.items():
                n_units = 3 + len(sequences[unit]) % 4
                units = torch.randint(0, size, (n_units,), generator=gen)
                f2p = torch.full((frames,), -1, dtype=torch.long)
                f2p[2:] = torch.arange(frames - 2) * n_units // (frames - 2)
                labels = torch.where(f2p >= 0, units[f2p.clamp(min=0)], -1)
                streams.update({f"{unit}.units": units.numpy(),
                                f"{unit}.frame_to_position": f2p.numpy(),
                                f"{unit}.frame_labels": labels.numpy()})
                sequences[unit].append((row["ID"], units.tolist()))
            writer.add(row["ID"], streams)
    for unit, size in SIZES.items():
        teacher = ShiftTeacher(vocab_size=size, name="shift", unit_type=unit)
        build_cache(teacher, sequences[unit], folder / "caches" / f"{unit}_train", k=8,
                    unit_type=unit, progress=False)
    return data, folder, dropped


def _hparams(data, folder, condition, output, **overrides):
    return load_hparams(KD_HPARAMS / f"{condition}.yaml", {
        **TINY, "data_folder": str(data), "prep_folder": str(folder),
        "output_folder": str(output), **overrides})


def _without_caches(folder, target):
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns("caches"))
    return target


def test_every_condition_trains_on_the_utterances_the_store_holds(prep, tmp_path, caplog):
    data, folder, dropped = prep
    with open(data / "train.csv", encoding="utf-8") as handle:
        n_rows = sum(1 for _ in handle) - 1
    train_ids = {}
    for condition in ("am_alone", "label_interpolation", "hierarchy", "hierarchy_no_lm"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sb_crossmodal_kd.kd_data"):
            train = asr_datasets(_hparams(data, folder, condition, tmp_path / condition))["train"]
        train_ids[condition] = sorted(train.data_ids)
        warnings = [r.getMessage() for r in caplog.records if "no units" in r.getMessage()]
        assert len(warnings) == 1, (condition, warnings)  # logged once, with count and store
        assert f"1 of {n_rows} train utterances" in warnings[0]
        assert str(folder / "units" / "train.units") in warnings[0]
    assert dropped not in train_ids["am_alone"] and len(train_ids["am_alone"]) == n_rows - 1
    for condition, ids in train_ids.items():
        assert ids == train_ids["am_alone"], condition
    assert sorted(UnitStore(folder / "units" / "train.units").ids()) == train_ids["am_alone"]


def test_teachers_are_read_only_where_a_head_distils(prep, tmp_path):
    data, folder, _ = prep
    hierarchy = asr_datasets(_hparams(data, folder, "hierarchy", tmp_path / "h"))["train"][0]
    no_lm = asr_datasets(_hparams(data, folder, "hierarchy_no_lm", tmp_path / "n"))["train"][0]
    for unit in SIZES:
        assert f"{unit}_top_probs" in hierarchy
        assert f"{unit}_top_probs" not in no_lm
        assert torch.equal(hierarchy[f"{unit}_frame_to_position"],
                           no_lm[f"{unit}_frame_to_position"])
    am_alone = asr_datasets(_hparams(data, folder, "am_alone", tmp_path / "a"))["train"][0]
    assert not any(key.endswith(("_units", "_top_probs")) for key in am_alone)
    # A prep folder without teacher caches: a distilling condition stops naming the cache,
    # the no-teacher control does not look for one.
    bare = _without_caches(folder, tmp_path / "bare")
    with pytest.raises(FileNotFoundError, match=r"caches/\w+_train/header.json not found"):
        asr_datasets(_hparams(data, bare, "hierarchy", tmp_path / "h2"))
    asr_datasets(_hparams(data, bare, "hierarchy_no_lm", tmp_path / "n2"))


def test_hierarchy_no_lm_trains_its_heads_on_hard_labels_without_any_teacher(prep, tmp_path):
    data, folder, _ = prep
    bare = _without_caches(folder, tmp_path / "prep")
    out = tmp_path / "run"
    results = run_asr_experiment(KD_HPARAMS / "hierarchy_no_lm.yaml", {
        **TINY, "data_folder": str(data), "prep_folder": str(bare), "output_folder": str(out)})
    assert results["epochs"] == 1 and results["params_with_heads"] > results["params"]
    line = (out / "train_log.txt").read_text().splitlines()[0]
    terms = set(re.findall(r"train loss_(\w+):", line))
    assert terms == {"main", "total", "frame_ce_senone", "frame_ce_monophone",
                     "frame_ce_subword"}
    assert not (bare / "caches").exists()
    saved = (out / "hyperparams.yaml").read_text()
    assert "condition: hierarchy_no_lm" in saved


def test_a_head_tau_other_than_its_cache_temperature_is_refused_before_training(prep, tmp_path):
    data, folder, _ = prep
    cache = folder / "caches" / "subword_train"
    # The head alone overridden: its cache (built at 1) is refused where heads meet caches.
    hparams = _hparams(data, folder, "aux_subword", tmp_path / "a", heads={"subword_tau": 2.0})
    assert hparams["modules"]["auxiliary_heads"]["subword"].tau == 2.0
    with pytest.raises(CacheMismatchError) as refused:
        asr_datasets(hparams)
    message = str(refused.value)
    assert str(cache) in message and "tau=2.0" in message and "temperature 1.0" in message
    # base.yaml's one number, set for head and cache alike: the cache is refused on opening.
    hparams = _hparams(data, folder, "aux_subword", tmp_path / "b", subword_tau=2.0)
    assert hparams["modules"]["auxiliary_heads"]["subword"].tau == 2.0
    with pytest.raises(CacheMismatchError, match=rf"{re.escape(str(cache))} does not match: "
                                                 r"temperature: cache has 1.0, the caller "
                                                 r"expects 2.0"):
        asr_datasets(hparams)  # the datasets come before the Brain: nothing has trained


def test_the_chain_builds_each_cache_at_its_teacher_tau(prep, tmp_path):
    from sb_crossmodal_kd.prep.settings import prep_settings
    from sb_crossmodal_kd.prep.steps import _teacher_cache
    from sb_crossmodal_kd.teachers import load_teacher
    from sb_crossmodal_kd.teachers.unit_lm import UnitLM, export_unit_lm

    _, folder, _ = prep
    torch.manual_seed(0)
    lm = UnitLM(N_MONOPHONES, embedding_dim=8, hidden_size=8, num_layers=1, dropout=0.0)
    with torch.no_grad():
        lm.net.out.w.weight.mul_(40.0)  # sharp logits, so that temperature 1 and 2 differ
    export_unit_lm(tmp_path / "lm" / "monophone" / "lm", lm, unit_type="monophone")
    store = folder / "units" / "train.units"
    settings = prep_settings(teacher_tau={"monophone": 2.0}, cache_k=N_MONOPHONES)
    built = _teacher_cache(tmp_path, "monophone", "train", store, settings, "cpu", False)
    cache = TeacherCache(built, temperature=2.0, unit_type="monophone")
    with pytest.raises(CacheMismatchError, match="temperature"):
        TeacherCache(built, temperature=1.0)
    teacher = load_teacher(tmp_path / "lm" / "monophone" / "lm")
    units = UnitStore(store)
    for utt_id in units.ids()[:4]:
        sequence = torch.tensor(units[utt_id]["monophone.units"], dtype=torch.long)[None]
        logits = teacher.unit_logits(sequence, torch.tensor([sequence.shape[1]]))[0].float()
        top_probs, top_ids, _ = cache.utterance(utt_id)
        cached = torch.zeros_like(logits).scatter(-1, top_ids, top_probs)
        at_two, at_one = torch.softmax(logits / 2, -1), torch.softmax(logits, -1)
        torch.testing.assert_close(cached, at_two, atol=2e-3, rtol=0)
        assert (cached - at_one).abs().max() > 0.05  # the test tells the temperatures apart


def test_data_prepared_before_teacher_tau_existed_counts_as_built_at_one(tmp_path):
    # ... and before lexicon and fit_vocab_size existed, and with the retired resample
    import json

    from sb_crossmodal_kd.prep.record import prep_record as _Record
    from sb_crossmodal_kd.prep.settings import prep_settings

    older = prep_settings()
    for added in ("teacher_tau", "lexicon", "fit_vocab_size"):
        del older[added]
    older["resample"] = True  # a retired setting: its 16 kHz copies are valid data still
    source = {"data_folder": "/data"}
    (tmp_path / "prep.json").write_text(json.dumps(
        {"format": "sbkd-kd-prep-1", **source, "settings": older, "steps": {}, "outputs": {}}))
    record = _Record(tmp_path, prep_settings(), source)  # the defaults: accepted as it is
    assert record.data["settings"]["teacher_tau"] == prep_settings()["teacher_tau"]
    with pytest.raises(FileExistsError, match="differs in: teacher_tau"):
        _Record(tmp_path, prep_settings(teacher_tau={"senone": 2.0}), source)
    with pytest.raises(FileExistsError, match="differs in: lexicon"):
        _Record(tmp_path, prep_settings(lexicon="my-lexicon.txt"), source)
    with pytest.raises(KeyError, match="teacher_tau"):
        prep_settings(teacher_tau={"phone": 2.0})
    with pytest.raises(ValueError, match="must be numbers > 0"):
        prep_settings(teacher_tau=0)
