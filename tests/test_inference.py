"""Exported models load in SpeechBrain's EncoderASR and decode as the trained model does.

Two tiny training runs on a tiny generated corpus: the baseline ASR recipe (CTCBrain, dense),
and a KD-style run (KDBrain with an auxiliary head on a Conformer whose FFNs are MoE layers).
The KD recipe's own data chain (alignments, senone tree, unit LMs, teacher caches) is slow,
so the KD-style run gets its head's subword targets from a uniform alignment of the tokens
instead, and its hparams are the KD recipe's model and checkpointer in a small file below.
"""

import csv
import json
from pathlib import Path

import pytest
import soundfile
import speechbrain as sb
import torch
import torchaudio
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.inference.ASR import EncoderASR

from sb_crossmodal_kd.alignment.framerate import FrameRate
from sb_crossmodal_kd.brain import count_parameters
from sb_crossmodal_kd.cli import main
from sb_crossmodal_kd.data.corpus import make_corpus
from sb_crossmodal_kd.decoding import NgramCTCBeamSearcher, load_ngram, train_ngram
from sb_crossmodal_kd.decoding.beam_search import DEFAULT_SETTINGS
from sb_crossmodal_kd.experiment import (
    asr_datasets,
    file_overrides,
    load_hparams,
    run_asr_experiment,
)
from sb_crossmodal_kd.inference import export_asr, load_asr, read_audio
from sb_crossmodal_kd.io import atomic_write_text, write_wav_atomic
from sb_crossmodal_kd.nnet.heads import inference_modules

BASELINE_HPARAMS = (Path(__file__).resolve().parents[1] / "recipes" / "SynthCommands" / "ASR"
                    / "hparams" / "conformer_ctc.yaml")
TINY_ASR = {
    "number_of_epochs": 2, "d_model": 32, "num_layers": 1, "nhead": 2, "d_ffn": 64,
    "n_mels": 40, "vocab_size": 40, "max_batch_seconds": 25, "warmup_steps": 5, "lr": 0.003,
}

# The KD recipe's model (hparams/base.yaml) at toy size: MoE FFNs and an auxiliary head.
KD_STYLE_HPARAMS = """
seed: 5
__set_seed: !apply:speechbrain.utils.seed.seed_everything [!ref <seed>, False]
data_folder: !PLACEHOLDER
output_folder: !PLACEHOLDER
save_folder: !ref <output_folder>/save
train_log: !ref <output_folder>/train_log.txt
results_file: !ref <output_folder>/results.json
wer_file: !ref <output_folder>/wer.txt
train_csv: !ref <data_folder>/train.csv
valid_csv: !ref <data_folder>/valid.csv
test_csv: !ref <data_folder>/test.csv
sample_rate: 16000
vocab_size: 40
blank_index: !ref <vocab_size>
d_model: 32
train_dataloader_opts: {batch_size: 8}
valid_dataloader_opts: {batch_size: 8}
test_dataloader_opts: {batch_size: 8}
tokenizer: !name:speechbrain.tokenizers.SentencePiece.SentencePiece
    model_dir: !ref <save_folder>/tokenizer
    vocab_size: !ref <vocab_size>
    annotation_train: !ref <train_csv>
    annotation_read: wrd
    model_type: unigram
    character_coverage: 1.0
compute_features: !new:speechbrain.lobes.features.Fbank
    sample_rate: !ref <sample_rate>
    n_mels: 40
normalize: !new:speechbrain.processing.features.InputNormalization
    norm_type: global
    update_until_epoch: 4
moe:
    ffn: {num_experts: 2, top_k: 1, every: 1, load_balancing_weight: 0.01}
encoder: !apply:sb_crossmodal_kd.nnet.conformer_moe.use_moe_ffn_settings
    encoder: !new:sb_crossmodal_kd.nnet.conformer.ConformerCTCEncoder
        n_mels: 40
        d_model: !ref <d_model>
        num_layers: 2
        nhead: 2
        d_ffn: 64
        kernel_size: 3
    settings: !ref <moe[ffn]>
    enabled: True
ctc_lin: !new:speechbrain.nnet.linear.Linear
    input_size: !ref <d_model>
    n_neurons: !ref <vocab_size> + 1
log_softmax: !new:speechbrain.nnet.activations.Softmax
    apply_log: True
heads: !new:sb_crossmodal_kd.nnet.heads.AuxiliaryHeads
    subword: !new:sb_crossmodal_kd.nnet.heads.AuxiliaryHead
        unit_type: subword
        layer: 1
        input_size: !ref <d_model>
        n_units: !ref <vocab_size>
        hidden_size: 16
        loss: frame_ce
        alpha: 0.0
modules:
    compute_features: !ref <compute_features>
    normalize: !ref <normalize>
    encoder: !ref <encoder>
    ctc_lin: !ref <ctc_lin>
    auxiliary_heads: !ref <heads>
brain_class: !name:sb_crossmodal_kd.kd_brain.KDBrain
opt_class: !name:torch.optim.AdamW
    lr: 0.003
lr_annealing: !new:speechbrain.nnet.schedulers.NoamScheduler
    lr_initial: 0.003
    n_warmup_steps: 5
epoch_counter: !new:speechbrain.utils.epoch_loop.EpochCounter
    limit: 2
checkpointer: !new:speechbrain.utils.checkpoints.Checkpointer
    checkpoints_dir: !ref <save_folder>
    recoverables:
        encoder: !ref <encoder>
        ctc_lin: !ref <ctc_lin>
        auxiliary_heads: !ref <heads>
        normalize: !ref <normalize>
        scheduler: !ref <lr_annealing>
        counter: !ref <epoch_counter>
train_logger: !new:speechbrain.utils.train_logger.FileTrainLogger
    save_file: !ref <train_log>
"""


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth")
    make_corpus(folder, progress=False, n_train=24, n_valid=6, n_test=6, n_text=100,
                n_text_valid=10, speakers=(3, 1, 1), seed=3)
    return folder


@pytest.fixture(scope="module")
def asr_run(tiny_corpus, tmp_path_factory):
    """The baseline recipe (CTCBrain, dense Conformer), trained for 2 epochs."""
    output = tmp_path_factory.mktemp("asr_run")
    overrides = {"data_folder": str(tiny_corpus), "output_folder": str(output), **TINY_ASR}
    run_asr_experiment(BASELINE_HPARAMS, overrides, {"device": "cpu"})
    return output


def uniform_subword_alignment(datasets, hparams):
    """Train items for the subword head: the tokens, spread evenly over the encoder frames."""
    rate = FrameRate()

    @sb.utils.data_pipeline.takes("sig", "tokens")
    @sb.utils.data_pipeline.provides("subword_units", "subword_frame_to_position")
    def units(sig, tokens):
        frames = rate.frames_for_samples(len(sig))
        yield tokens
        yield torch.arange(frames) * len(tokens) // frames

    datasets["train"].add_dynamic_item(units)
    datasets["train"].set_output_keys(
        ["id", "sig", "wrd", "tokens", "subword_units", "subword_frame_to_position"])


@pytest.fixture(scope="module")
def kd_moe_run(tiny_corpus, tmp_path_factory):
    """A KD-style run: KDBrain, an auxiliary head, MoE FFNs, trained for 2 epochs."""
    folder = tmp_path_factory.mktemp("kd_run")
    # As in the KD recipe: a condition file wraps the shared base in `experiment:`.
    atomic_write_text(folder / "base.yaml", KD_STYLE_HPARAMS)
    hparams_file = folder / "moe_with_head.yaml"
    atomic_write_text(hparams_file, "experiment: !include:base.yaml\n    seed: 5\n")
    output = folder / "run"
    overrides = {"data_folder": str(tiny_corpus), "output_folder": str(output)}
    hparams = load_hparams(hparams_file, overrides)
    sb.create_experiment_directory(output, hyperparams_to_save=str(hparams_file),
                                   overrides=file_overrides(hparams_file, overrides))
    hparams["dataset_pipelines"] = uniform_subword_alignment
    datasets = asr_datasets(hparams)
    brain = hparams["brain_class"](modules=hparams["modules"], opt_class=hparams["opt_class"],
                                   hparams=hparams, run_opts={"device": "cpu"},
                                   checkpointer=hparams["checkpointer"])
    brain.fit(hparams["epoch_counter"], datasets["train"], datasets["valid"],
              train_loader_kwargs=hparams["train_dataloader_opts"],
              valid_loader_kwargs=hparams["valid_dataloader_opts"])
    assert "acc_subword" in (output / "train_log.txt").read_text()  # the head did train
    assert (output / "hyperparams.yaml").read_text().count("\nexperiment:") == 1
    return output


def corpus_wavs(corpus, n=2):
    """Paths of the first ``n`` test utterances."""
    with open(corpus / "test.csv", newline="") as handle:
        return [row["wav"] for row in csv.DictReader(handle)][:n]


def trained_model(run):
    """The run's Brain with its best checkpoint, as the recipe tests it."""
    hparams = load_hparams(run / "hyperparams.yaml")
    hparams["tokenizer"] = hparams["tokenizer"]()
    brain = hparams["brain_class"](modules=hparams["modules"], opt_class=hparams["opt_class"],
                                   hparams=hparams, run_opts={"device": "cpu"},
                                   checkpointer=hparams["checkpointer"])
    brain.checkpointer.recover_if_possible(min_key="WER")
    brain.modules.eval()
    return brain


def training_side_decoding(brain, wav):
    """Log-probs and greedy CTC transcript of one file by the Brain's own forward pass."""
    batch = PaddedBatch([{"id": "utt", "sig": sb.dataio.dataio.read_audio(wav)}])
    with torch.no_grad():
        predictions = brain.compute_forward(batch, sb.Stage.TEST)
    hyps = sb.decoders.ctc_greedy_decode(predictions["log_probs"], predictions["lengths"],
                                         blank_id=brain.hparams.blank_index)
    return predictions["log_probs"][0], brain.hparams.tokenizer.sp.decode_ids(hyps[0])


@pytest.mark.parametrize("run_name", ["asr_run", "kd_moe_run"])
def test_export_loads_in_encoder_asr_and_decodes_as_trained(run_name, request, tiny_corpus,
                                                            tmp_path):
    run = request.getfixturevalue(run_name)
    record = export_asr(run, tmp_path / "model")
    assert record["complete"] and record["checkpoint_meta"]["WER"] >= 0
    # The model card says what was trained on what, how well, and how to load it.
    card = (tmp_path / "model" / "README.md").read_text()
    assert "README.md" in record["files"] and "EncoderASR.from_hparams" in card
    assert f"valid WER of this checkpoint (the run's best): {record['checkpoint_meta']['WER']:.2f}" in card
    assert "`d_model`" in card and str(run) in card
    brain = trained_model(run)
    # Loaded the SpeechBrain way, through a savedir (SpeechBrain links the files there) and
    # in place (load_asr): both give the trained model's outputs.
    linked = EncoderASR.from_hparams(source=str(tmp_path / "model"),
                                     savedir=str(tmp_path / "savedir"))
    in_place = load_asr(tmp_path / "model")
    pieces = brain.hparams.tokenizer.sp
    assert [in_place.tokenizer.id_to_piece(i) for i in range(in_place.tokenizer.vocab_size())] \
        == [pieces.id_to_piece(i) for i in range(pieces.vocab_size())]
    for wav in corpus_wavs(tiny_corpus):
        log_probs, text = training_side_decoding(brain, wav)
        for asr in (linked, in_place):
            exported = asr.encode_batch(read_audio(asr, wav)[None], torch.tensor([1.0]))[0]
            assert exported.shape == log_probs.shape
            assert torch.allclose(exported, log_probs, atol=1e-5)
            assert asr.transcribe_file(wav) == text


def test_kd_export_has_no_heads_and_keeps_the_experts(kd_moe_run, tmp_path):
    record = export_asr(kd_moe_run, tmp_path / "model")
    assert record["dropped_modules"] == ["auxiliary_heads"]
    brain = trained_model(kd_moe_run)
    weights = torch.load(tmp_path / "model" / "encoder.ckpt")
    trained = {f"{role}.{key}": value for role in ("compute_features", "normalize", "encoder", "ctc_lin")
               for key, value in brain.modules[role].state_dict().items()}
    assert set(weights) == set(trained)  # exactly the inference modules: no head weights
    assert all(torch.equal(weights[key], trained[key]) for key in weights)
    assert any(".experts." in key for key in weights)
    heads = count_parameters(brain.modules["auxiliary_heads"])
    assert record["parameters"] == count_parameters(inference_modules(brain.modules))
    assert record["parameters"] == count_parameters(brain.modules) - heads
    stats = torch.load(tmp_path / "model" / "normalizer.ckpt")
    assert torch.equal(stats["glob_mean"], brain.modules["normalize"].glob_mean)
    assert stats["count"] == brain.modules["normalize"].count > 0


def test_cli_export_then_transcribe(asr_run, tiny_corpus, tmp_path, capsys):
    model = tmp_path / "model"
    assert main(["export", "--run", str(asr_run), "--output", str(model)]) == 0
    assert "Transcribe: sbkd transcribe" in capsys.readouterr().out
    wav = corpus_wavs(tiny_corpus, 1)[0]
    signal = sb.dataio.dataio.read_audio(wav)
    eight_khz = tmp_path / "eight_khz.wav"
    write_wav_atomic(eight_khz, torchaudio.functional.resample(signal, 16000, 8000).numpy(), 8000)
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("not audio")
    status = main(["transcribe", "--model", str(model), wav, str(not_audio), str(eight_khz)])
    out, err = capsys.readouterr()
    assert status == 1  # one file could not be read; the others are transcribed
    asr = load_asr(model)
    assert out.splitlines() == [f"{wav}\t{asr.transcribe_file(wav)}",
                                f"{eight_khz}\t{asr.transcribe_file(str(eight_khz))}"]
    assert f"{not_audio}: cannot read it as audio" in err
    assert read_audio(asr, eight_khz).shape[0] == 2 * soundfile.info(str(eight_khz)).frames
    # A refused export says why on stderr, with no traceback
    assert main(["export", "--run", str(asr_run), "--output", str(tmp_path)]) == 2
    assert "is not empty and holds no earlier export" in capsys.readouterr().err


def test_export_refuses_a_folder_with_other_files(asr_run, tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty.*--force"):
        export_asr(asr_run, target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    export_asr(asr_run, target, force=True)
    assert (target / "notes.txt").read_text() == "keep me"
    record = json.loads((target / "export.json").read_text())
    assert sorted(record["files"]) == ["README.md", "encoder.ckpt", "hyperparams.yaml",
                                       "normalizer.ckpt", "tokenizer.ckpt"]
    export_asr(asr_run, target)  # an earlier export is replaced without --force
    assert (target / "notes.txt").read_text() == "keep me"


def test_export_and_load_say_what_is_missing(tiny_corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="hyperparams.yaml"):
        export_asr(tmp_path, tmp_path / "model")
    untrained = {"data_folder": str(tiny_corpus), "output_folder": str(tmp_path / "untrained")}
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        export_asr(BASELINE_HPARAMS, tmp_path / "model", overrides=untrained)
    assert not (tmp_path / "model").exists()
    with pytest.raises(FileNotFoundError, match="not a complete exported model"):
        load_asr(tmp_path / "nowhere")


# Decoding with a word n-gram LM ------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus_lm(tiny_corpus, tmp_path_factory):
    """A trigram LM on the corpus's LM text (the text-only sentences)."""
    return train_ngram(tiny_corpus / "lm_text" / "train.txt",
                       tmp_path_factory.mktemp("lm") / "lm.arpa")


def lm_decoder(asr, arpa, **settings):
    """The searcher the exported model should decode with, built from the LM file here."""
    pieces = [asr.tokenizer.id_to_piece(i) for i in range(asr.tokenizer.vocab_size())]
    return NgramCTCBeamSearcher(int(asr.hparams.blank_index), pieces, load_ngram(arpa),
                                **settings)


def test_export_with_an_lm_decodes_with_it(asr_run, tiny_corpus, corpus_lm, tmp_path):
    arpa = tmp_path / "lm.arpa"
    corpus_lm.write_arpa(arpa)
    settings = {"lm_weight": 0.7, "word_insertion_bonus": 0.5, "beam_width": 8}
    record = export_asr(asr_run, tmp_path / "model", lm=arpa, lm_settings=settings)
    assert record["lm"] == {"source": str(arpa), "order": 3, "words": len(corpus_lm.words),
                            **settings}
    assert "lm.ckpt" in record["files"]
    assert "3-gram word LM" in (tmp_path / "model" / "README.md").read_text()
    greedy_export = export_asr(asr_run, tmp_path / "greedy")
    assert greedy_export["lm"] is None
    greedy = load_asr(tmp_path / "greedy")
    linked = EncoderASR.from_hparams(source=str(tmp_path / "model"),
                                     savedir=str(tmp_path / "savedir"))
    in_place = load_asr(tmp_path / "model")
    expected = lm_decoder(in_place, arpa, **settings)
    for wav in corpus_wavs(tiny_corpus):
        log_probs = in_place.encode_batch(read_audio(in_place, wav)[None], torch.tensor([1.0]))
        text = expected.transcribe(log_probs)[0]
        for asr in (linked, in_place):
            assert isinstance(asr.decoding_function, NgramCTCBeamSearcher)
            assert asr.decoding_function.settings == settings
            assert asr.transcribe_file(wav) == text
        # Greedy decoding of the LM export is the plain export's.
        assert load_asr(tmp_path / "model", greedy=True).transcribe_file(wav) \
            == greedy.transcribe_file(wav)
    # Another LM weight on the exported LM, and an LM on a model exported without one.
    assert load_asr(tmp_path / "model", lm_weight=0.0).decoding_function.settings \
        == {**settings, "lm_weight": 0.0}
    with_lm = load_asr(tmp_path / "greedy", lm=arpa, beam_width=4)
    assert with_lm.decoding_function.settings == {**DEFAULT_SETTINGS, "beam_width": 4}


def test_cli_transcribe_with_an_lm_and_bad_lms_refused(asr_run, tiny_corpus, corpus_lm,
                                                       tmp_path, capsys):
    model = tmp_path / "model"
    arpa = tmp_path / "lm.arpa"
    corpus_lm.write_arpa(arpa)
    assert main(["export", "--run", str(asr_run), "--output", str(model)]) == 0
    capsys.readouterr()
    wav = corpus_wavs(tiny_corpus, 1)[0]
    assert main(["transcribe", "--model", str(model), "--lm", str(arpa), "--beam", "4",
                 wav]) == 0
    expected = load_asr(model, lm=arpa, beam_width=4).transcribe_file(wav)
    assert capsys.readouterr().out == f"{wav}\t{expected}\n"

    upper = tmp_path / "upper.txt"  # the corpus is lower case: an LM its pieces cannot spell
    upper.write_text((tiny_corpus / "lm_text" / "train.txt").read_text().upper())
    train_ngram(upper, tmp_path / "upper.arpa")
    (tmp_path / "garbage.arpa").write_text("this is not an LM\n")
    refused = {
        "missing.arpa": "missing.arpa: no such LM file",
        "garbage.arpa": "garbage.arpa: not a well-formed ARPA n-gram model",
        "upper.arpa": "The LM does not match the tokenizer: only 0 of its",
    }
    for name, message in refused.items():
        for command in (["transcribe", "--model", str(model), "--lm", str(tmp_path / name),
                         wav],
                        ["export", "--run", str(asr_run), "--output", str(tmp_path / "out"),
                         "--lm", str(tmp_path / name)]):
            assert main(command) == 2
            out, err = capsys.readouterr()
            assert out == "" and len(err.splitlines()) == 1 and message in err, err
            assert not (tmp_path / "out").exists()  # refused before anything was written
    assert main(["transcribe", "--model", str(model), "--lm-weight", "1", wav]) == 2
    assert "exported without an LM" in capsys.readouterr().err
