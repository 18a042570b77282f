"""Pretrained front ends (transformers wav2vec 2.0 / WavLM, SpeechBrain encoders) under the
MoE layers and heads, loaded from tiny local folders through the real loading code."""

from pathlib import Path

import pytest
import speechbrain as sb
import torch
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.lobes.features import Fbank
from speechbrain.processing.features import InputNormalization
from speechbrain.utils.checkpoints import Checkpointer

from sb_crossmodal_kd.experiment import load_hparams
from sb_crossmodal_kd.nnet.conformer import ConformerCTCEncoder
from sb_crossmodal_kd.nnet.dmoe import DeepMoE
from sb_crossmodal_kd.nnet.heads import AuxiliaryHead, AuxiliaryHeads
from sb_crossmodal_kd.nnet.pretrained import (
    SpeechBrainFrontEnd,
    Wav2Vec2FrontEnd,
    WaveformEncoder,
)
from sb_crossmodal_kd.nnet.taps import EncoderTaps

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "SynthCommands"
HIDDEN = 16
TINY = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            conv_dim=(8, 8), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=8,
            num_conv_pos_embedding_groups=2, hidden_dropout=0.0, attention_dropout=0.0,
            activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0)


def _save_transformers_model(folder, model_type="wav2vec2", **settings):
    """A tiny randomly initialised model written by save_pretrained; returns it (eval)."""
    transformers = pytest.importorskip("transformers")  # the [hf] extra

    torch.manual_seed(0)
    if model_type == "wav2vec2":
        model = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**TINY, **settings))
    else:
        config = transformers.WavLMConfig(**TINY, num_buckets=8, max_bucket_distance=20,
                                          **settings)
        model = transformers.WavLMModel(config)
    model.save_pretrained(folder)
    return model.eval()


def _waves(lengths=(1600, 1200), seed=0):
    gen = torch.Generator().manual_seed(seed)
    wavs = torch.zeros(len(lengths), max(lengths))
    for row, n in enumerate(lengths):
        wavs[row, :n] = 0.1 * torch.randn(n, generator=gen)
    return wavs, torch.tensor(lengths, dtype=torch.float) / max(lengths)


@pytest.mark.parametrize("model_type", ["wav2vec2", "wavlm"])
def test_transformers_front_end_gives_the_saved_models_layers(tmp_path, model_type):
    reference = _save_transformers_model(tmp_path, model_type)
    wavs, _ = _waves((1600,))
    normalized = (wavs - wavs.mean()) / wavs.std(unbiased=False)
    with torch.no_grad():
        expected = reference(normalized, output_hidden_states=True)
    last = Wav2Vec2FrontEnd(tmp_path).eval()
    layer1 = Wav2Vec2FrontEnd(tmp_path, output_layer=1).eval()
    frames, frame_lens = last(wavs, torch.ones(1))
    assert frames.shape == (1, last.frames(1600), HIDDEN) and float(frame_lens) == 1.0
    torch.testing.assert_close(frames, expected.last_hidden_state, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer1(wavs)[0], expected.hidden_states[1], atol=1e-4, rtol=1e-4)


def test_padding_leaves_real_frames_unchanged_with_an_attention_mask(tmp_path):
    # Layer-normalised convolutions: the model takes an attention mask (WavLM-large style).
    _save_transformers_model(tmp_path, feat_extract_norm="layer", do_stable_layer_norm=True)
    front = Wav2Vec2FrontEnd(tmp_path).eval()
    wavs, lengths = _waves((1600, 1000))
    padded, frame_lens = front(wavs, lengths)
    alone, _ = front(wavs[1:, :1000])
    n_frames = int(front.frames(1000))
    assert float(frame_lens[1]) == pytest.approx(n_frames / padded.shape[1])
    torch.testing.assert_close(padded[1, :n_frames], alone[0], atol=1e-4, rtol=1e-4)
    assert torch.count_nonzero(padded[1, n_frames:]) == 0


def _heads():
    return AuxiliaryHeads(
        low=AuxiliaryHead("monophone", 1, 8, 5, alpha=1.0),
        high=AuxiliaryHead("subword", 2, 8, 6, alpha=1.0),
    )


def _forward_backward(encoder, heads):
    taps = EncoderTaps(encoder, layers=heads.layers)
    wavs, lengths = _waves()
    with taps.capture() as hidden:
        output = encoder(wavs, lengths)
    logits = heads(hidden)
    loss = output.pow(2).mean() + sum(x.pow(2).mean() for x in logits.values())
    loss.backward()
    return output


def _grads(module):
    return {name: p.grad is not None and bool(p.grad.abs().sum() > 0)
            for name, p in module.named_parameters()}


def test_frozen_front_end_gets_no_gradient_and_stays_in_eval(tmp_path):
    _save_transformers_model(tmp_path)
    front = Wav2Vec2FrontEnd(tmp_path, output_layer="weighted")
    encoder = WaveformEncoder(front, DeepMoE(HIDDEN, num_layers=2, layer_size=8, num_experts=2))
    heads = _heads()
    encoder.train()
    assert not front.model.training and encoder.layers.training
    output = _forward_backward(encoder, heads)
    assert output.shape[:2] == (2, front.frames(1600))
    assert not any(p.requires_grad or p.grad is not None for p in front.model.parameters())
    assert all(_grads(encoder.layers).values()) and all(_grads(heads).values())
    assert front.layer_weights.grad is not None  # the layer mix trains on a frozen model


def test_fine_tuning_keeps_the_feature_encoder_fixed(tmp_path):
    _save_transformers_model(tmp_path)
    front = Wav2Vec2FrontEnd(tmp_path, freeze=False, freeze_feature_encoder=True)
    encoder = WaveformEncoder(front, DeepMoE(HIDDEN, num_layers=2, layer_size=8, num_experts=2))
    encoder.train()
    assert front.model.encoder.training and not front.model.feature_extractor.training
    _forward_backward(encoder, _heads())
    grads = _grads(front.model)
    assert not any(v for name, v in grads.items() if name.startswith("feature_extractor."))
    assert any(v for name, v in grads.items() if name.startswith("encoder.layers."))


def test_wrong_folders_are_clear_errors(tmp_path):
    transformers = pytest.importorskip("transformers")  # the [hf] extra

    with pytest.raises(FileNotFoundError, match="is not a local folder"):
        Wav2Vec2FrontEnd(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(FileNotFoundError, match=r"no config.json.*notes.txt"):
        Wav2Vec2FrontEnd(tmp_path)
    bert = tmp_path / "bert"
    transformers.BertModel(transformers.BertConfig(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
        vocab_size=20)).save_pretrained(bert)
    with pytest.raises(ValueError, match=r"model_type 'bert'.*BertModel.*wav2vec2"):
        Wav2Vec2FrontEnd(bert)
    speech = tmp_path / "speech"
    _save_transformers_model(speech)
    with pytest.raises(ValueError, match="output_layer 3 for a model with 2 layers"):
        Wav2Vec2FrontEnd(speech, output_layer=3)
    with pytest.raises(ValueError, match="takes input_size=32: set its input_size to 16"):
        WaveformEncoder(Wav2Vec2FrontEnd(speech), DeepMoE(32, num_layers=1, layer_size=8))
    (speech / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="could not load the Wav2Vec2Model weights"):
        Wav2Vec2FrontEnd(speech)


def _conformer(**settings):
    return ConformerCTCEncoder(n_mels=20, d_model=HIDDEN, num_layers=1, nhead=2, d_ffn=32,
                               kernel_size=3, **settings)


def _speechbrain_checkpoint(folder):
    """A baseline-recipe style checkpoint (encoder.ckpt, normalize.ckpt) written by
    SpeechBrain's Checkpointer; returns its folder and the trained pipeline (eval)."""
    torch.manual_seed(0)
    features, normalize, encoder = Fbank(n_mels=20), InputNormalization(), _conformer()
    wavs, lengths = _waves((3200, 2400), seed=1)
    normalize(features(wavs), lengths)  # global statistics from one batch
    checkpointer = Checkpointer(folder, {"encoder": encoder, "normalize": normalize})
    checkpoint = checkpointer.save_checkpoint()
    return checkpoint.path, (features, normalize.eval(), encoder.eval())


def test_speechbrain_encoder_loads_from_a_checkpoint_folder(tmp_path):
    path, (features, normalize, encoder) = _speechbrain_checkpoint(tmp_path / "save")
    front = SpeechBrainFrontEnd(_conformer(), path, compute_features=Fbank(n_mels=20),
                                normalize=InputNormalization(),
                                normalizer_checkpoint="normalize.ckpt")
    assert not list(tmp_path.glob("**/*.ckpt.*")) and not any(
        p.is_symlink() for p in tmp_path.glob("**/*"))  # files read in place
    wavs, lengths = _waves((3200, 2400), seed=2)
    frames, frame_lens = front(wavs, lengths)
    with torch.no_grad():
        expected = encoder(normalize(features(wavs), lengths), lengths)
    n_real = int(torch.round(lengths[1] * frames.shape[1]))
    torch.testing.assert_close(frames[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(frames[1, :n_real], expected[1, :n_real], atol=1e-5, rtol=1e-5)
    assert torch.equal(frame_lens, lengths) and front.frames(3200) == frames.shape[1]

    stack = WaveformEncoder(front, DeepMoE(HIDDEN, num_layers=2, layer_size=8, num_experts=2))
    stack.train()
    assert not front.encoder.training and not front.normalize.training
    heads = _heads()
    _forward_backward(stack, heads)
    assert not any(p.grad is not None for p in front.parameters())
    assert all(_grads(stack.layers).values()) and all(_grads(heads).values())


def test_speechbrain_checkpoint_mismatch_is_a_clear_error(tmp_path):
    path, _ = _speechbrain_checkpoint(tmp_path / "save")
    with pytest.raises(ValueError, match=r"encoder.ckpt does not fit the ConformerCTCEncoder"):
        SpeechBrainFrontEnd(ConformerCTCEncoder(n_mels=20, d_model=HIDDEN, num_layers=2,
                                                nhead=2, d_ffn=32, kernel_size=3), path)
    with pytest.raises(FileNotFoundError, match=r"has no \['normalizer.ckpt'\].*normalize.ckpt"):
        SpeechBrainFrontEnd(_conformer(), path, normalize=InputNormalization())
    with pytest.raises(FileNotFoundError, match="is not a local folder"):
        SpeechBrainFrontEnd(_conformer(), tmp_path / "speechbrain/asr-model")


# The recipes' hparams -------------------------------------------------------------------

UNITS = {"senone": 9, "monophone": 7, "subword": 12}
RECIPE_SIZES = {"d_model": 8, "num_layers": 3, "num_experts": 2, "n_senones": 9,
                "n_monophones": 7, "vocab_size": 12, "teacher_caches": None, "dropout": 0.0}


def _kd_batch(n_frames, lengths=(3200, 2400), k=3):
    """Waveforms, CTC tokens and, per unit type, units aligned to ``n_frames(samples)``
    encoder frames with a teacher's top-k triple, as the KD pipeline provides them."""
    gen = torch.Generator().manual_seed(3)
    examples = []
    for i, n in enumerate(lengths):
        example = {"id": f"utt{i}", "wrd": "a b", "sig": 0.1 * torch.randn(n, generator=gen),
                   "tokens": torch.randint(0, UNITS["subword"], (3,), generator=gen)}
        frames = int(n_frames(n))
        for unit_type, size in UNITS.items():
            units = torch.randint(0, size, (3,), generator=gen)
            f2p = torch.full((frames,), -1, dtype=torch.long)
            f2p[1:] = torch.arange(frames - 1) * 3 // (frames - 1)
            probs, ids = torch.softmax(torch.randn(3, size, generator=gen), -1).topk(k, dim=-1)
            example.update({f"{unit_type}_units": units,
                            f"{unit_type}_frame_to_position": f2p,
                            f"{unit_type}_top_probs": probs, f"{unit_type}_top_ids": ids,
                            f"{unit_type}_residual": 1 - probs.sum(-1)})
        examples.append(example)
    return PaddedBatch(examples)


def _recipe_training_step(tmp_path, recipe, overrides):
    hparams = load_hparams(RECIPES / "KD" / "hparams" / "pretrained" / recipe, {
        "data_folder": str(tmp_path / "data"), "prep_folder": str(tmp_path / "prep"),
        "output_folder": str(tmp_path / "out"), **RECIPE_SIZES, **overrides})
    brain = hparams["brain_class"](
        modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
        run_opts={"device": "cpu"}, checkpointer=hparams["checkpointer"])
    front = hparams["modules"]["encoder"].front_end
    before = {n: p.detach().clone() for n, p in brain.modules.named_parameters()}
    brain.init_optimizers()
    brain.on_stage_start(sb.Stage.TRAIN, epoch=1)
    loss = brain.fit_batch(_kd_batch(front.frames))
    brain.on_stage_end(sb.Stage.TRAIN, float(loss), epoch=1)
    assert torch.isfinite(loss)
    assert {"loss_kd_senone", "loss_kd_monophone", "loss_kd_subword", "loss_moe"} <= set(
        brain.train_stats)
    changed = {n for n, p in brain.modules.named_parameters() if not torch.equal(p, before[n])}
    assert not any(n.startswith("encoder.front_end.") for n in changed)  # frozen
    for prefix in ("encoder.layers.", "auxiliary_heads.senone", "auxiliary_heads.subword",
                   "ctc_lin."):
        assert any(n.startswith(prefix) for n in changed), prefix
    brain.checkpointer.save_and_keep_only()
    assert brain.checkpointer.recover_if_possible() is not None
    return brain


def test_wav2vec2_moe_recipe_trains_with_heads(tmp_path):
    _save_transformers_model(tmp_path / "wavlm", "wavlm")
    brain = _recipe_training_step(tmp_path, "wav2vec2_moe.yaml", {
        "pretrained_source": str(tmp_path / "wavlm"), "pretrained_size": HIDDEN})
    assert type(brain.modules["encoder"].front_end.model).__name__ == "WavLMModel"


def test_speechbrain_encoder_moe_recipe_trains_with_heads(tmp_path):
    path, _ = _speechbrain_checkpoint(tmp_path / "asr")
    _recipe_training_step(tmp_path, "speechbrain_encoder_moe.yaml", {
        "pretrained_source": str(path), "pretrained_n_mels": 20, "pretrained_size": HIDDEN,
        "pretrained_layers": 1, "pretrained_nhead": 2, "pretrained_d_ffn": 32,
        "pretrained_kernel_size": 3})


def test_speechbrain_lm_example_is_a_subword_teacher_for_the_cache(tmp_path):
    import sentencepiece
    from hyperpyyaml import load_hyperpyyaml

    from sb_crossmodal_kd.teachers.cache import TeacherCache, build_cache
    from sb_crossmodal_kd.teachers.speechbrain_lm import SpeechBrainLMTeacher

    example = RECIPES / "LM" / "hparams" / "pretrained" / "speechbrain_lm_teacher.yaml"
    tiny = {"vocab_size": 30, "d_model": 16, "nhead": 2, "num_layers": 2, "d_ffn": 32}
    folder = tmp_path / "lm"
    folder.mkdir()
    (folder / "hyperparams.yaml").write_text(example.read_text())
    text = tmp_path / "text.txt"
    text.write_text("turn on the kitchen lights\nturn off the oven please\n" * 30)
    sentencepiece.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(tmp_path / "spm"), vocab_size=30,
        model_type="unigram", minloglevel=2, hard_vocab_limit=False)
    (folder / "tokenizer.ckpt").write_bytes((tmp_path / "spm.model").read_bytes())
    torch.manual_seed(0)
    with open(example) as handle:  # the LM the example builds, standing for a trained one
        lm = load_hyperpyyaml(handle, tiny)["lm_model"].eval()
    torch.save(lm.state_dict(), folder / "lm.ckpt")

    teacher = SpeechBrainLMTeacher.from_hparams(folder, overrides=tiny)
    assert (teacher.vocab_size, teacher.bos_index, teacher.unit_type) == (30, 1, "subword")
    sequences = [("utt0", [5, 9, 7, 12]), ("utt1", [8, 15])]
    build_cache(teacher, sequences, tmp_path / "cache", k=4, progress=False)
    cache = TeacherCache(tmp_path / "cache", vocab_size=30, unit_type="subword")
    for utt_id, sequence in sequences:
        with torch.no_grad():
            logits = lm(torch.tensor([[1] + sequence[:-1]]))[0]
        logits[:, [0, 1, 2]] = float("-inf")  # excluded_units: not pieces
        expected, expected_ids = torch.softmax(logits, -1).topk(4, dim=-1)
        probs, ids, _ = cache.utterance(utt_id)
        assert torch.equal(ids.long(), expected_ids)
        torch.testing.assert_close(probs.float(), expected, atol=1e-3, rtol=1e-3)
