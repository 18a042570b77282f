"""recipes/Manifest: the KD data chain from a user's own JSON and CSV manifests plus an LM text,
one epoch of a KD condition on it, and the errors a user with bad input meets."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from launch import torchrun_command
from tiny_kd import tiny_chain

from sb_crossmodal_kd.data.corpus import make_corpus
from sb_crossmodal_kd.data.manifest import ManifestError, check_manifest
from sb_crossmodal_kd.pipeline import prep_settings, prepare_kd_data_from_manifests
from sb_crossmodal_kd.prep.lm_text import _lm_texts

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "Manifest"
TINY_MODEL = [
    "--number_of_epochs=1", "--d_model=32", "--num_layers=3", "--nhead=2", "--d_ffn=64",
    "--n_mels=40", "--warmup_steps=5", "--max_batch_seconds=30", "--teacher_k=8",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth").resolve()
    paths = make_corpus(folder, progress=False, n_train=20, n_valid=4, n_test=4, n_text=100,
                        n_text_valid=10, speakers=(3, 1, 1), seed=7)
    return folder, paths


def write_user_manifests(corpus_dir, paths, folder):
    """The corpus as a user would bring it: train as SpeechBrain JSON with ``{data_root}``,
    valid and test as CSVs with ``$data_root``; audio paths relative to the data root."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split in ("train", "valid", "test"):
        rows = check_manifest(paths[split])
        for row in rows:
            row["wav"] = str(Path(row["wav"]).relative_to(corpus_dir))
        if split == "train":
            entries = {row["ID"]: {"wav": "{data_root}/" + row["wav"],
                                   "duration": float(row["duration"]), "wrd": row["wrd"],
                                   "spk_id": row["spk_id"]} for row in rows}
            out[split] = folder / "train.json"
            out[split].write_text(json.dumps(entries, indent=1))
        else:
            lines = ["ID,duration,wav,wrd"] + [
                f"{r['ID']},{r['duration']},$data_root/{r['wav']},{r['wrd']}" for r in rows]
            out[split] = folder / f"{split}.csv"
            out[split].write_text("\n".join(lines) + "\n")
    return out


def write_user_lexicon(paths, path):
    """The user's own lexicon, in LibriSpeech's layout: every word of the corpus and its LM
    text, pronounced as CMUdict does (so the chain's outputs stay comparable)."""
    from sb_crossmodal_kd.units.lexicon import Lexicon

    cmudict = Lexicon.from_cmudict(oov_policy="g2p")
    words = set()
    for source in (paths["train"], paths["valid"], paths["test"]):
        words.update(w for row in check_manifest(source) for w in row["wrd"].split())
    words.update(paths["lm_train"].read_text().split())
    lines = [f"{w.upper()}\t{' '.join(cmudict.pronounce(w))}" for w in sorted(words)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    corpus_dir, paths = corpus
    user = tmp_path_factory.mktemp("user").resolve()
    manifests = write_user_manifests(corpus_dir, paths, user / "manifests")
    lexicon = write_user_lexicon(paths, user / "my-lexicon.txt")
    (user / "prep.yaml").write_text(tiny_chain() + f"lexicon: {lexicon}\n")
    prep = user / "prep"
    cmd = [sys.executable, str(RECIPE / "manifest_prepare.py"),
           *[arg for split, path in manifests.items() for arg in (f"--{split}", str(path))],
           "--lm_text", str(paths["lm_train"]), "--output", str(prep),
           "--settings", str(user / "prep.yaml"), "--data_root", str(corpus_dir)]
    # One thread, as the tests' own processes: the phone model's training is then the same
    # float operations here and there, and the steps can be compared byte for byte.
    subprocess.run(cmd, check=True, cwd=user, capture_output=True, text=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return user, manifests, prep


def test_chain_from_json_and_csv_manifests_and_lm_text(corpus, prepared):
    corpus_dir, paths = corpus
    _, manifests, prep = prepared
    record = json.loads((prep / "prep.json").read_text())
    assert record["manifests"]["train"] == str(manifests["train"])
    assert record["lm_text"] == str(paths["lm_train"]) and "corpus" not in record["settings"]
    assert set(record["steps"]) >= {"manifests", "senone_tree", "unit_lms", "teacher_caches"}
    # The JSON became the KD recipe's CSV, audio paths filled in and the extra column kept.
    train = check_manifest(prep / "data" / "train.csv")
    original = check_manifest(paths["train"])
    assert [(r["ID"], r["wav"], r["wrd"], r["spk_id"]) for r in train] == [
        (r["ID"], r["wav"], r["wrd"], r["spk_id"]) for r in original]
    # The unit LMs read the given LM text (sampled down to max_train_sentences), not the
    # transcripts, and held out the valid transcripts.
    lm_train = (prep / "lm_text" / "train.txt").read_text().splitlines()
    all_text = set(paths["lm_train"].read_text().splitlines())
    assert len(lm_train) == 60 and set(lm_train) <= all_text
    valid_words = [r["wrd"] for r in check_manifest(prep / "data" / "valid.csv")]
    assert (prep / "lm_text" / "valid.txt").read_text().splitlines() == valid_words
    # The user's lexicon, not CMUdict, pronounced the words for the aligner and the LMs.
    from sb_crossmodal_kd.units.lexicon import Lexicon

    user_lexicon = Lexicon.from_file(_tiny_settings(prepared[0])["lexicon"], oov_policy="g2p")
    assert record["outputs"]["lexicon"] == user_lexicon.hash
    assert record["outputs"]["lexicon"].startswith("my-lexicon.txt-")
    for unit in ("monophone", "senone"):
        recipe = (prep / "lm" / unit / "hyperparams.yaml").read_text()
        assert f"lexicon_file: {prep.parent / 'my-lexicon.txt'}" in recipe
    for unit in ("subword", "monophone", "senone"):
        lm = json.loads((prep / "lm" / unit / "results.json").read_text())
        assert lm["train_sentences"] == 60 and lm["valid_sentences"] == 4
        assert (prep / "caches" / f"{unit}_train" / "header.json").is_file()


def test_rerun_skips_and_another_lm_text_is_refused(corpus, prepared, tmp_path):
    _, paths = corpus
    user, manifests, prep = prepared
    settings = prep_settings(**{**_tiny_settings(user), "corpus": {"n_train": 1}})  # ignored
    outputs = [prep / "data" / "train.csv", prep / "align" / "aligner.pt",
               prep / "senone_tree.json", prep / "lm" / "senone" / "results.json"]
    before = [path.stat().st_mtime_ns for path in outputs]
    prepare_kd_data_from_manifests(manifests, prep, lm_text=paths["lm_train"], settings=settings,
                                   replacements={"data_root": str(corpus[0])})
    assert [path.stat().st_mtime_ns for path in outputs] == before  # nothing redone
    with pytest.raises(FileExistsError, match="differs in: lm_text"):
        prepare_kd_data_from_manifests(manifests, prep, lm_text=paths["lm_valid"],
                                       settings=settings)
    with pytest.raises(ValueError, match="manifests lacks test"):
        prepare_kd_data_from_manifests({"train": manifests["train"],
                                        "valid": manifests["valid"]}, tmp_path / "p")
    with pytest.raises(ValueError, match="names test_other, which manifests lacks"):
        prepare_kd_data_from_manifests(manifests, tmp_path / "q",
                                       settings=prep_settings(splits=["train", "test_other"]))


SMALL_SHARDS = 4  # rows per shard in these tests: several shards per split, for every worker


def _chain_options(corpus, user):
    return {"lm_text": corpus[1]["lm_train"], "settings": prep_settings(**_tiny_settings(user)),
            "replacements": {"data_root": str(corpus[0])}, "through": "unit_stores"}


def _seeded(prep, folder):
    """A prep folder holding ``prep``'s tokenizer (its training is not sharded), so that the
    steps after it, the phone model's training included, can be compared byte for byte."""
    import shutil

    folder.mkdir(parents=True)
    shutil.copytree(prep / "tokenizer", folder / "tokenizer")
    return folder


def _sharded_outputs(settings, tree=True):
    splits = settings["splits"]
    return (["senone_tree.json"] if tree else []) + ["align/aligner.pt"] + [
        *[f"align/{split}_phone_alignments.json" for split in splits],
        *[f"units/{split}.units" for split in splits]]


def _same_bytes(folder, reference, names):
    for name in names:  # the same bytes but for the folder's own path (the manifest's)
        assert ((folder / name).read_bytes().replace(bytes(folder), b"")
                == (reference / name).read_bytes().replace(bytes(reference), b"")), name


@pytest.fixture(scope="module")
def small_shards(corpus, prepared, tmp_path_factory):
    """The sharded steps in one process, with shards of SMALL_SHARDS rows."""
    _, manifests, prep = prepared
    folder = _seeded(prep, tmp_path_factory.mktemp("small_shards") / "prep")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sb_crossmodal_kd.alignment.sharded.SHARD_SIZE", SMALL_SHARDS)
        prepare_kd_data_from_manifests(manifests, folder, jobs=1,
                                       **_chain_options(corpus, prepared[0]))
    return folder


def test_two_jobs_prepare_the_same_bytes_and_an_older_prep_folder_is_kept(
        corpus, prepared, small_shards, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr("sb_crossmodal_kd.alignment.sharded.SHARD_SIZE", SMALL_SHARDS)
    user, manifests, prep = prepared
    options = _chain_options(corpus, user)
    assert len(list((small_shards / "align" / "train_shards").glob("*.jsonl"))) >= 3
    two = _seeded(prep, tmp_path / "two_jobs")
    prepare_kd_data_from_manifests(manifests, two, jobs=2, **options)
    _same_bytes(two, small_shards, _sharded_outputs(options["settings"]))
    # Alignments and stores do not depend on the shard size either (the 1-process recipe's).
    _same_bytes(two, prep, _sharded_outputs(options["settings"], tree=False))
    # A folder prepared before the shards: its one-document alignments become shards, nothing
    # is aligned again and the stores are kept.
    older = tmp_path / "older"
    shutil.copytree(two, older)
    splits = options["settings"]["splits"]
    for split in splits:
        shutil.rmtree(older / "align" / f"{split}_shards")
    kept = {name: (older / name).stat().st_mtime_ns
            for name in _sharded_outputs(options["settings"]) if "units" in name}
    prepare_kd_data_from_manifests(manifests, older, **options)
    assert {name: (older / name).stat().st_mtime_ns for name in kept} == kept
    for split in splits:
        shards = sorted((older / "align" / f"{split}_shards").glob("shard-*.jsonl"))
        assert [p.read_bytes() for p in shards] == [
            p.read_bytes() for p in sorted((two / "align" / f"{split}_shards").glob("*.jsonl"))]
    with pytest.raises(ValueError, match="jobs must be a positive number"):
        prepare_kd_data_from_manifests(manifests, tmp_path / "bad", jobs=0, **options)


CHAIN_UNDER_TORCHRUN = """
import json, sys
from sb_crossmodal_kd.distributed import init_distributed
from sb_crossmodal_kd.pipeline import prep_settings, prepare_kd_data_from_manifests

import sb_crossmodal_kd.alignment.sharded as sharded

init_distributed({})
sharded.SHARD_SIZE = int(sys.argv[4])  # several shards per rank
manifests, prep, options = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
prepare_kd_data_from_manifests(manifests, prep, settings=prep_settings(**options.pop("settings")),
                               through="unit_stores", **options)
"""


def test_the_chain_under_torchrun_writes_what_one_process_does(corpus, prepared, small_shards,
                                                               tmp_path):
    user, manifests, prep = prepared
    ranks = _seeded(prep, tmp_path / "ranks")
    (tmp_path / "chain.py").write_text(CHAIN_UNDER_TORCHRUN)
    options = {"lm_text": str(corpus[1]["lm_train"]), "settings": _tiny_settings(user),
               "replacements": {"data_root": str(corpus[0])}}
    run = subprocess.run(
        torchrun_command([str(tmp_path / "chain.py"), json.dumps({k: str(v) for k, v in
                                                                   manifests.items()}),
                          str(ranks), json.dumps(options), str(SMALL_SHARDS)]),
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    _same_bytes(ranks, small_shards, _sharded_outputs(prep_settings(**_tiny_settings(user))))
    record = json.loads((ranks / "prep.json").read_text())
    assert set(record["steps"]) >= {"manifests", "lexicon_alignment", "unit_stores"}


def test_a_small_vocabulary_task_is_told_its_largest_vocab_size(corpus, tmp_path):
    # Digits or commands: a few words cannot make 40 subword pieces. Told not to fit the
    # size, the chain says how many they can make, before aligning anything.
    corpus_dir, paths = corpus
    rows = check_manifest(paths["train"])
    words = ["yes", "no", "up", "down"]
    small = {}
    for split in ("train", "valid", "test"):
        lines = ["ID,duration,wav,wrd"] + [
            f"{r['ID']},{r['duration']},{r['wav']},{words[i % 4]} {words[(i + 1) % 4]}"
            for i, r in enumerate(rows[:6])]
        small[split] = tmp_path / f"{split}.csv"
        small[split].write_text("\n".join(lines) + "\n")
    prep = tmp_path / "prep"
    with pytest.raises(ValueError, match=r"vocab_size 40 is more subword pieces than the train "
                                         r"transcripts .* can make \(at most \d+\): set"):
        prepare_kd_data_from_manifests(small, prep,
                                       settings=prep_settings(vocab_size=40, fit_vocab_size=False))
    assert not (prep / "align").exists()


def _tiny_settings(user):
    import ruamel.yaml

    return ruamel.yaml.YAML(typ="safe").load((user / "prep.yaml").read_text())


def test_one_kd_condition_trains_on_the_prepared_manifests(prepared):
    user, _, prep = prepared
    out = user / "run"
    cmd = [sys.executable, str(RECIPE / "train.py"), str(RECIPE / "hparams" / "kd.yaml"),
           "--condition=label_interpolation", f"--prep_folder={prep}",
           f"--output_folder={out}", *TINY_MODEL]
    subprocess.run(cmd, check=True, cwd=user, capture_output=True, text=True)
    results = json.loads((out / "results.json").read_text())
    assert results["utterances"] == 4 and results["epochs"] == 1
    log = (out / "train_log.txt").read_text()
    assert "train loss_li_main" in log and "loss_kd_" not in log
    saved = (out / "hyperparams.yaml").read_text()
    assert "condition: label_interpolation" in saved and "label_interpolation: 0.3" in saved
    assert "label_interpolation_frames: ctc" in saved  # the CTC path's frames, not the spans


def test_hierarchy_with_moe_trains_in_two_ddp_processes(prepared):
    # Every moving part under torchrun: taps on three encoder layers, three heads distilled
    # from their teachers' caches, MoE feed-forwards with their auxiliary loss.
    user, _, prep = prepared
    out = user / "run_ddp"
    args = [str(RECIPE / "train.py"), str(RECIPE / "hparams" / "kd.yaml"),
            "--condition=hierarchy_moe", f"--prep_folder={prep}", f"--output_folder={out}",
            *TINY_MODEL]
    run = subprocess.run(torchrun_command(args), cwd=user, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["utterances"] == 4 and results["epochs"] == 1
    log = (out / "train_log.txt").read_text()
    for term in ("loss_kd_senone", "loss_kd_monophone", "loss_kd_subword", "loss_moe"):
        assert f"train {term}" in log, term


def test_bad_json_manifests_name_file_and_utterance(tmp_path):
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"u1": {"wav": "a.wav", "duration": 1.0, "wrd": "hi"},
                                   "u2": {"wav": "a.wav", "duration": 1.0}}))
    with pytest.raises(ManifestError, match=r"missing\.json, entry 'u2': missing field\(s\) wrd"):
        check_manifest(missing, check_audio=False)
    broken = tmp_path / "broken.json"
    broken.write_text('{"u1": {"wav": "a.wav",\n "duration": 1.0 "wrd": "hi"}}')
    with pytest.raises(ManifestError, match=r"broken\.json: not valid JSON \(line 2"):
        check_manifest(broken)
    no_audio = tmp_path / "no_audio.json"
    no_audio.write_text(json.dumps({"u7": {"wav": str(tmp_path / "nope.flac"), "duration": 1.0,
                                           "wrd": "hi"}}))
    with pytest.raises(ManifestError, match=r"entry 'u7' \(utterance u7\): audio file .*nope"):
        check_manifest(no_audio)
    unfilled = tmp_path / "unfilled.json"
    unfilled.write_text(json.dumps({"u1": {"wav": "{data_root}/a.wav", "duration": 1.0,
                                           "wrd": "hi"}}))
    with pytest.raises(ManifestError, match="data_root"):
        check_manifest(unfilled, check_audio=False)


def test_csv_row_with_unquoted_comma_is_named(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("ID,duration,wav,wrd\nu1,1.0,a.wav,hello\nu2,1.0,a.wav,hello, world\n")
    with pytest.raises(ManifestError, match=r"m\.csv, line 3: 5 fields for 4 columns"):
        check_manifest(path, check_audio=False)


def test_without_lm_text_the_lms_read_the_train_transcripts(tmp_path, caplog):
    manifests = {}
    for split, words in (("train", ["one two", "three"]), ("valid", ["four"])):
        manifests[split] = tmp_path / f"{split}.csv"
        manifests[split].write_text("ID,duration,wav,wrd\n" + "".join(
            f"{split}{i},1.0,a.wav,{w}\n" for i, w in enumerate(words)))
    with caplog.at_level(logging.INFO, logger="sb_crossmodal_kd.prep.lm_text"):
        texts = _lm_texts(tmp_path / "lm_text", None, None, manifests, max_sentences=10)
    assert texts["train"].read_text() == "one two\nthree\n"
    assert texts["valid"].read_text() == "four\n"
    assert "No LM text given" in caplog.text


def test_an_8khz_ten_word_corpus_runs_end_to_end_with_the_defaults(tmp_path, caplog):
    # A telephone digits task as users bring it: 8 kHz audio, ten words. With no settings
    # the chain resamples on load (saying so), fits the vocabulary to what ten words can
    # make, and a hierarchy condition trains on it; the user's files stay as they were.
    import soundfile
    from tiny_kd import DIGITS, digits_corpus_8khz

    paths = digits_corpus_8khz(tmp_path / "digits")
    before = {p: p.read_bytes() for p in (tmp_path / "digits").rglob("*") if p.is_file()}
    prep = tmp_path / "prep"
    with caplog.at_level("INFO"):
        record = prepare_kd_data_from_manifests(paths, prep)
    assert "30 of 30 audio files are not at 16000 Hz (30 at 8000 Hz)" in caplog.text
    assert "vocab_size 40 is more subword pieces" in caplog.text
    vocab_size = record["outputs"]["vocab_size"]
    assert len(DIGITS) < vocab_size < 40
    train = check_manifest(prep / "data" / "train.csv")
    assert all(soundfile.info(row["wav"]).samplerate == 8000 for row in train)  # no copies
    out = tmp_path / "run"
    cmd = [sys.executable, str(RECIPE / "train.py"), str(RECIPE / "hparams" / "kd.yaml"),
           "--condition=hierarchy", f"--prep_folder={prep}", f"--output_folder={out}",
           *TINY_MODEL]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["utterances"] == 6 and results["epochs"] == 1
    saved = (out / "hyperparams.yaml").read_text()
    assert f"vocab_size: {vocab_size}" in saved
    log = (out / "train_log.txt").read_text()
    for term in ("loss_kd_senone", "loss_kd_monophone", "loss_kd_subword"):
        assert f"train {term}" in log, term
    assert {p: p.read_bytes() for p in (tmp_path / "digits").rglob("*") if p.is_file()} == before


def test_your_own_speechbrain_recipe_trains_with_moe_and_heads(prepared):
    # recipes/OwnRecipe: SpeechBrain's conformer CTC recipe (TransformerASR) with the lines
    # that add MoE feed-forwards and three distilled heads; its Brain is mixed with KDMixin.
    user, _, prep = prepared
    own = Path(__file__).resolve().parents[1] / "recipes" / "OwnRecipe"
    out = user / "own_recipe"
    cmd = [sys.executable, str(own / "train.py"), str(own / "hparams" / "conformer_ctc_kd.yaml"),
           f"--prep_folder={prep}", f"--output_folder={out}", "--number_of_epochs=1",
           "--d_model=32", "--nhead=2", "--d_ffn=64"]
    run = subprocess.run(cmd, cwd=user, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    log = (out / "train_log.txt").read_text()
    train_line = next(line for line in log.splitlines() if "train loss:" in line)
    terms = dict(part.strip().split(": ") for part in
                 train_line.split(" - ")[1].split(", "))
    for term in ("loss_kd_senone", "loss_kd_monophone", "loss_kd_subword", "loss_main"):
        assert float(terms[f"train {term}"]) > 0, term
    assert float(terms["train loss_moe"]) > 0  # the balancing loss was collected
    assert "test WER" in log
    assert any((out / "expert_usage").glob("*.png"))
    assert "without its load-balancing" not in run.stderr  # no uncollected MoE loss
