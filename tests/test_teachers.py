"""Teacher adapters agree with a manual computation on tiny models loaded through the real
loading paths (transformers ``from_pretrained``, SpeechBrain hparams + Pretrainer)."""

import math

import pytest
import torch

from sb_crossmodal_kd.teachers import load_teacher
from sb_crossmodal_kd.teachers.base import (
    TopKDistributions,
    kl_divergence,
    topk_from_log_probs,
)

WORDS = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "<eos>"] + [f"w{i}" for i in range(11)]
SPECIAL = [0, 1, 2, 3, 4]
SEQUENCES = [[5, 9, 7, 12, 6], [8, 15], [10, 11, 5]]


def _padded(sequences):
    lengths = torch.tensor([len(s) for s in sequences])
    ids = torch.zeros(len(sequences), int(lengths.max()), dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, : len(s)] = torch.tensor(s)
    return ids, lengths


def _save_tokenizer(folder):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[PAD]"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", bos_token="<eos>", eos_token="<eos>", unk_token="[PAD]",
    )
    tokenizer.save_pretrained(folder)


def _manual_softmax(logits, tau):
    logits = logits.clone().float()
    logits[..., SPECIAL] = float("-inf")
    return torch.softmax(logits / tau, dim=-1)


def test_hf_causal_adapter_matches_manual_gpt2(tmp_path):
    pytest.importorskip("transformers")  # the [hf] extra
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from sb_crossmodal_kd.teachers.hf import HFCausalLMTeacher
    from sb_crossmodal_kd.units.subwords import PretrainedTokenizerUnits

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(WORDS), n_positions=16, n_embd=16, n_layer=2, n_head=2,
                        bos_token_id=4, eos_token_id=4, pad_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    _save_tokenizer(tmp_path)

    teacher = HFCausalLMTeacher.from_pretrained(tmp_path)
    assert isinstance(load_teacher(tmp_path), HFCausalLMTeacher)  # kind found from config.json
    assert teacher.context == "causal"
    assert teacher.vocab_size == len(WORDS)
    assert teacher.tokenizer_hash == PretrainedTokenizerUnits(str(tmp_path)).hash
    ids, lengths = _padded(SEQUENCES)
    tau = 2.0
    probs = teacher(ids, lengths / ids.shape[1], tau=tau)  # relative lengths

    reference = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for row, sequence in enumerate(SEQUENCES):
        # P(y_k | y_<k): the model reads [BOS, y_1..y_{K-1}], unpadded, one sequence at a time.
        inputs = torch.tensor([[4] + sequence[:-1]])
        with torch.no_grad():
            expected = _manual_softmax(reference(input_ids=inputs).logits[0], tau)
        torch.testing.assert_close(probs[row, : len(sequence)], expected, atol=1e-5, rtol=1e-4)
    assert float(probs[..., SPECIAL].max()) == 0.0


def test_hf_masked_adapter_matches_one_position_at_a_time(tmp_path):
    pytest.importorskip("transformers")  # the [hf] extra
    from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM

    from sb_crossmodal_kd.teachers.hf import HFMaskedLMTeacher

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=16)
    BertForMaskedLM(config).save_pretrained(tmp_path)
    _save_tokenizer(tmp_path)

    teacher = HFMaskedLMTeacher.from_pretrained(tmp_path, max_sequences=3)  # several chunks
    assert isinstance(load_teacher(tmp_path), HFMaskedLMTeacher)
    assert teacher.context == "bidirectional"
    assert (teacher.mask_token_id, teacher.cls_token_id, teacher.sep_token_id) == (3, 1, 2)
    ids, lengths = _padded(SEQUENCES)
    probs = teacher(ids, lengths, tau=1.0)

    reference = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    for row, sequence in enumerate(SEQUENCES):
        for k in range(len(sequence)):
            inputs = torch.tensor([[1] + sequence + [2]])
            inputs[0, k + 1] = 3  # P(y_k | y_{!=k})
            with torch.no_grad():
                expected = _manual_softmax(reference(input_ids=inputs).logits[0, k + 1], 1.0)
            torch.testing.assert_close(probs[row, k], expected, atol=1e-5, rtol=1e-4)


def _write_speechbrain_lm(folder, spm_model):
    """A SpeechBrain pretrained-LM folder in the shape of the LibriSpeech ASR models."""
    from speechbrain.lobes.models.transformer.TransformerLM import TransformerLM

    torch.manual_seed(0)
    lm = TransformerLM(vocab=30, d_model=16, nhead=2, num_encoder_layers=2,
                       num_decoder_layers=0, d_ffn=32, dropout=0.0)
    torch.save(lm.state_dict(), folder / "lm.ckpt")
    (folder / "tokenizer.ckpt").write_bytes(spm_model.read_bytes())
    (folder / "hyperparams.yaml").write_text(
        "bos_index: 1\n"
        "eos_index: 2\n"
        "lm_model: !new:speechbrain.lobes.models.transformer.TransformerLM.TransformerLM\n"
        "    vocab: 30\n    d_model: 16\n    nhead: 2\n    num_encoder_layers: 2\n"
        "    num_decoder_layers: 0\n    d_ffn: 32\n    dropout: 0.0\n"
        "tokenizer: !new:sentencepiece.SentencePieceProcessor\n"
        "pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer\n"
        "    loadables:\n"
        "        lm: !ref <lm_model>\n"
        "        tokenizer: !ref <tokenizer>\n"
    )
    return lm


def test_speechbrain_lm_through_hparams_and_pretrainer(tmp_path):
    import sentencepiece

    from sb_crossmodal_kd.teachers.speechbrain_lm import SpeechBrainLMTeacher, file_sha256

    text = tmp_path / "text.txt"
    text.write_text("turn on the kitchen lights\nturn off the oven please\n" * 30)
    sentencepiece.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(tmp_path / "spm"), vocab_size=30,
        model_type="unigram", minloglevel=2, hard_vocab_limit=False,
    )
    folder = tmp_path / "lm"
    folder.mkdir()
    lm = _write_speechbrain_lm(folder, tmp_path / "spm.model")

    teacher = SpeechBrainLMTeacher.from_hparams(folder, excluded_units=[1, 2])
    assert teacher.vocab_size == 30 and teacher.bos_index == 1
    assert teacher.describe()["tokenizer_file_sha256"] == file_sha256(folder / "tokenizer.ckpt")
    ids, lengths = _padded([[5, 9, 7, 12], [8, 15]])
    probs = teacher(ids, lengths, tau=0.5)

    lm.eval()
    for row, sequence in enumerate([[5, 9, 7, 12], [8, 15]]):
        with torch.no_grad():
            logits = lm(torch.tensor([[1] + sequence[:-1]]))[0]
        logits[:, [1, 2]] = float("-inf")
        expected = torch.softmax(logits / 0.5, dim=-1)
        torch.testing.assert_close(probs[row, : len(sequence)], expected, atol=1e-5, rtol=1e-4)


def test_speechbrain_lm_folder_errors_name_the_problem(tmp_path):
    from sb_crossmodal_kd.teachers.speechbrain_lm import SpeechBrainLMTeacher

    with pytest.raises(FileNotFoundError, match="hyperparams.yaml"):
        SpeechBrainLMTeacher.from_hparams(tmp_path)
    (tmp_path / "hyperparams.yaml").write_text("lm_model: 3\n")
    with pytest.raises(KeyError, match="pretrainer"):
        SpeechBrainLMTeacher.from_hparams(tmp_path)


def test_topk_kl_is_exact_at_full_k_and_a_lower_bound_below():
    torch.manual_seed(0)
    teacher = torch.log_softmax(torch.randn(2, 4, 30) * 2, -1)
    student = torch.log_softmax(torch.randn(2, 4, 30), -1).requires_grad_()
    full_kl = (teacher.exp() * (teacher - student)).sum(-1)

    full = topk_from_log_probs(teacher, k=30)
    torch.testing.assert_close(kl_divergence(full, student), full_kl, atol=1e-5, rtol=1e-5)
    previous = torch.zeros_like(full_kl)
    for k in (1, 4, 16, 29):
        approx = kl_divergence(topk_from_log_probs(teacher, k), student)
        assert bool((approx <= full_kl + 1e-5).all())
        assert bool((approx >= previous - 1e-5).all())  # more of the teacher, closer to full
        previous = approx
    kl_divergence(topk_from_log_probs(teacher, 4), student).sum().backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_topk_tail_term_is_the_coarsened_kl():
    teacher = torch.tensor([[[0.5, 0.3, 0.1, 0.1]]]).log()
    student = torch.tensor([[[0.25, 0.25, 0.3, 0.2]]]).log()
    top2 = topk_from_log_probs(teacher, 2)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.3 * math.log(0.3 / 0.25) + 0.2 * math.log(0.2 / 0.5)
    assert math.isclose(float(kl_divergence(top2, student)), expected, rel_tol=1e-5)


def test_padding_positions_are_zero_and_dense_sums_to_one():
    from sb_crossmodal_kd.teachers.speechbrain_lm import SpeechBrainLMTeacher
    from sb_crossmodal_kd.teachers.unit_lm import UnitLM

    torch.manual_seed(0)
    teacher = SpeechBrainLMTeacher(UnitLM(6, embedding_dim=8, hidden_size=8, num_layers=1),
                                   vocab_size=6, bos_index=1, unit_offset=2)
    ids, lengths = _padded([[1, 2, 3], [4]])
    dist = teacher.distributions(ids, lengths, k=3)
    assert isinstance(dist, TopKDistributions)
    assert dist.top_probs.dtype == torch.float32 and dist.top_ids.dtype == torch.int64
    assert float(dist.top_probs[1, 1:].abs().sum() + dist.residual[1, 1:].abs().sum()) == 0.0
    totals = dist.top_probs.sum(-1) + dist.residual
    torch.testing.assert_close(totals[0], torch.ones(3))
    probs = teacher(ids, lengths)
    dense = dist.to_dense(6)
    torch.testing.assert_close(dense[0].sum(-1), torch.ones(3))
    torch.testing.assert_close(dense[0].gather(-1, dist.top_ids[0]),
                               probs[0].gather(-1, dist.top_ids[0]))
    torch.testing.assert_close(teacher.distributions(ids, lengths, k=6).to_dense(6)[0], probs[0])


def test_reference_kl_agrees_with_the_training_loss():
    from sb_crossmodal_kd.losses import topk_kl_divergence

    torch.manual_seed(1)
    teacher = torch.log_softmax(torch.randn(3, 5, 40) * 3, -1)
    student = torch.randn(3, 5, 40)
    for k in (1, 8, 40):
        dist = topk_from_log_probs(teacher, k)
        torch.testing.assert_close(kl_divergence(dist, torch.log_softmax(student, -1)),
                                   topk_kl_divergence(student, *dist), atol=1e-5, rtol=1e-4)
