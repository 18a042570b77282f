"""KDBrain trains the CTC model with heads, distillation and MoE losses chosen by hparams."""

import json
from pathlib import Path

import pytest
import sentencepiece as spm
import speechbrain as sb
import torch
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.dataio.dataset import DynamicItemDataset
from speechbrain.lobes.features import Fbank
from speechbrain.nnet.activations import Softmax
from speechbrain.processing.features import InputNormalization

from sb_crossmodal_kd.alignment.framerate import FrameRate
from sb_crossmodal_kd.kd_brain import KDBrain, KDMixin, fit_frames, teacher_items
from sb_crossmodal_kd.losses import DistillationObjective
from sb_crossmodal_kd.nnet.conformer import ConformerCTCEncoder
from sb_crossmodal_kd.nnet.conformer_moe import use_moe_ffn
from sb_crossmodal_kd.nnet.heads import AuxiliaryHead, AuxiliaryHeads
from sb_crossmodal_kd.teachers.base import Teacher
from sb_crossmodal_kd.teachers.cache import CacheMismatchError, TeacherCache, build_cache

D, VOCAB = 16, 12
UNITS = {"senone": 9, "monophone": 7, "subword": VOCAB}
RATE = FrameRate()


class ShiftTeacher(Teacher):
    """A deterministic toy LM: prefers unit (previous + 1), with some spread."""

    def unit_logits(self, unit_ids, lengths):
        previous = torch.cat([unit_ids[:, :1] * 0, unit_ids[:, :-1]], 1)
        target = torch.nn.functional.one_hot((previous + 1) % self.vocab_size, self.vocab_size)
        return 2.0 * target.float() + 0.1 * torch.arange(self.vocab_size).float()


def _utterances(n=4, seed=0):
    """Audio plus, per unit type, a unit sequence and a frame alignment to it."""
    gen = torch.Generator().manual_seed(seed)
    data = []
    for i in range(n):
        samples = 3200 + 800 * i
        frames = RATE.frames_for_samples(samples)
        item = {"id": f"utt{i}", "sig": 0.1 * torch.randn(samples, generator=gen),
                "wrd": "a b"}
        item["tokens"] = torch.randint(0, VOCAB, (2 + i % 2,), generator=gen)
        for unit_type, size in UNITS.items():
            n_units = 2 + i % 3
            units = torch.randint(0, size, (n_units,), generator=gen)
            # frame -> position: leading silence (-1), then units in order over the frames
            f2p = torch.full((frames,), -1, dtype=torch.long)
            f2p[1:] = torch.arange(frames - 1) * n_units // (frames - 1)
            item[f"{unit_type}_units"] = units
            item[f"{unit_type}_frame_to_position"] = f2p
        data.append(item)
    return data


def _caches(tmp_path, data, tau=1.0):
    caches = {}
    for unit_type, size in UNITS.items():
        teacher = ShiftTeacher(vocab_size=size, name="shift", unit_type=unit_type,
                               tokenizer_hash="toy")
        sequences = [(item["id"], item[f"{unit_type}_units"].tolist()) for item in data]
        build_cache(teacher, sequences, tmp_path / unit_type, k=3, tau=tau, progress=False)
        caches[unit_type] = TeacherCache(tmp_path / unit_type, vocab_size=size)
    return caches


def _batch(data, caches):
    examples = []
    for item in data:
        example = dict(item)
        for unit_type, cache in caches.items():
            probs, ids, rest = cache.utterance(item["id"])
            example.update({f"{unit_type}_top_probs": probs, f"{unit_type}_top_ids": ids,
                            f"{unit_type}_residual": rest})
        examples.append(example)
    return PaddedBatch(examples)


class _Tokenizer:
    def __init__(self, folder):
        text = folder / "text.txt"
        text.write_text("\n".join(["a b", "b a", "a a b", "b b a"] * 20))
        spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(folder / "sp"),
                                       vocab_size=VOCAB, model_type="char",
                                       character_coverage=1.0, bos_id=-1, eos_id=-1)
        self.sp = spm.SentencePieceProcessor(model_file=str(folder / "sp.model"))


def _brain(tmp_path, heads=None, distillation=None, moe=False, caches=None):
    torch.manual_seed(0)
    encoder = ConformerCTCEncoder(n_mels=20, d_model=D, num_layers=3, nhead=2, d_ffn=32,
                                  kernel_size=3, front_channels=(4, 4), dropout=0.0)
    if moe:
        use_moe_ffn(encoder.layers, num_experts=2, top_k=1, load_balancing_weight=0.01)
    modules = {"compute_features": Fbank(n_mels=20), "normalize": InputNormalization(),
               "encoder": encoder, "ctc_lin": torch.nn.Linear(D, VOCAB + 1)}
    if heads is not None:
        modules["auxiliary_heads"] = heads
    hparams = {
        "blank_index": VOCAB,
        "log_softmax": Softmax(apply_log=True),
        "lr_annealing": lambda optimizer: None,
        "train_logger": sb.utils.train_logger.FileTrainLogger(tmp_path / "log.txt"),
        "tokenizer": _Tokenizer(tmp_path),
        "epoch_counter": sb.utils.epoch_loop.EpochCounter(1),
        "wer_file": tmp_path / "wer.txt",
        "results_file": tmp_path / "results.json",
    }
    if distillation is not None:
        hparams["distillation"] = distillation
    if caches is not None:
        hparams["teacher_caches"] = caches
    return KDBrain(modules=modules, opt_class=lambda p: torch.optim.SGD(p, lr=0.1),
                   hparams=hparams, run_opts={"device": "cpu"})


def _hierarchy():
    return AuxiliaryHeads(
        senone=AuxiliaryHead("senone", 1, D, UNITS["senone"], loss="frame_ce",
                             loss_weight=0.2, alpha=1.0),
        monophone=AuxiliaryHead("monophone", 2, D, UNITS["monophone"], alpha=0.5, tau=2.0),
        subword=AuxiliaryHead("subword", 3, D, VOCAB, hidden_size=8, loss="ctc",
                              loss_weight=0.3, alpha=1.0),
    )


def _train_step(brain, batch):
    brain.init_optimizers()
    brain.on_stage_start(sb.Stage.TRAIN, epoch=1)
    loss = brain.fit_batch(batch)
    brain.on_stage_end(sb.Stage.TRAIN, float(loss), epoch=1)
    return loss


CONDITIONS = {
    "am_alone": (None, None, False, {"main", "total"}),
    "label_interpolation": (None, DistillationObjective(0.3, main_blank_index=VOCAB), False,
                            {"main", "li_main", "total"}),
    "aux_subword": (lambda: AuxiliaryHeads(subword=AuxiliaryHead("subword", 3, D, VOCAB)),
                    None, False, {"main", "kd_subword", "total"}),
    "hierarchy": (_hierarchy, None, False,
                  {"main", "kd_senone", "frame_ce_senone", "kd_monophone", "kd_subword",
                   "ctc_subword", "total"}),
    "hierarchy_moe": (_hierarchy, None, True,
                      {"main", "kd_senone", "frame_ce_senone", "kd_monophone", "kd_subword",
                       "ctc_subword", "moe", "total"}),
}


@pytest.mark.parametrize("condition", sorted(CONDITIONS))
def test_each_condition_trains_and_logs_its_terms(tmp_path, condition):
    make_heads, objective, moe, terms = CONDITIONS[condition]
    data = _utterances()
    caches = _caches(tmp_path, data)
    brain = _brain(tmp_path, make_heads() if make_heads else None, objective, moe)
    before = {n: p.detach().clone() for n, p in brain.modules.named_parameters()}
    loss = _train_step(brain, _batch(data, caches))
    assert torch.isfinite(loss)
    logged = brain.train_stats
    assert {k[len("loss_"):] for k in logged if k.startswith("loss_")} == terms
    head_names = list(brain.modules["auxiliary_heads"]) if make_heads else []
    assert {k for k in logged if k.startswith("acc_")} == {f"acc_{n}" for n in head_names}
    assert all(0.0 <= logged[f"acc_{n}"] <= 1.0 for n in head_names)
    expected_total = logged["loss_main"] + sum(
        w * logged[f"loss_{name}"] for name, w in _weights(brain).items() if name in terms)
    assert logged["loss_total"] == pytest.approx(expected_total, rel=1e-4)
    changed = {n for n, p in brain.modules.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("encoder.") for n in changed)
    if make_heads:  # heads with a loss learn, and their gradient reaches the encoder
        assert any(n.startswith("auxiliary_heads.") for n in changed)


def _weights(brain):
    weights = {"li_main": brain.objective.label_interpolation_weight,
               "moe": brain.objective.moe_weight}
    if "auxiliary_heads" in brain.modules:
        for name, head in brain.modules["auxiliary_heads"].items():
            weights[f"kd_{name}"] = head.alpha
            weights[f"{head.loss}_{name}"] = head.loss_weight
    return weights


def test_kd_gradient_reaches_the_tapped_encoder_layer_only_from_below(tmp_path):
    # a distillation-only head on layer 1: the encoder's first layer gets gradient from it
    data = _utterances()
    caches = _caches(tmp_path, data)
    heads = AuxiliaryHeads(senone=AuxiliaryHead("senone", 1, D, UNITS["senone"]))
    brain = _brain(tmp_path, heads)
    batch = _batch(data, caches)
    predictions = brain.compute_forward(batch, sb.Stage.TRAIN)
    targets = brain.unit_targets(batch, predictions["log_probs"].shape[1])
    total, log = brain.objective(predictions["log_probs"].sum() * 0, heads=heads,
                                 head_logits=brain.head_logits, targets=targets)
    total.backward()
    layers = brain.modules.encoder.layers.layers
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in layers[0].parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in layers[2].parameters())


def test_teachers_come_from_the_batch_only_never_from_a_cache_in_the_brain(tmp_path):
    # One way in: the datasets' teacher items. A batch without them is refused, even with
    # the caches in hparams, naming the missing fields and where they come from.
    data = _utterances()
    caches = _caches(tmp_path, data)
    brain = _brain(tmp_path, _hierarchy(), caches=caches)
    with_fields = _batch(data, caches)
    without = PaddedBatch([{k: v for k, v in item.items()} for item in data])
    n_frames = brain.compute_forward(with_fields, sb.Stage.TRAIN)["log_probs"].shape[1]
    targets = brain.unit_targets(with_fields, n_frames)
    probs, ids, _ = caches["senone"].utterance(data[0]["id"])
    assert torch.equal(targets["senone"].teacher[1][0, : len(ids)], ids)
    with pytest.raises(KeyError, match=r"the batch has no \w+_top_probs / \w+_top_ids / "
                                       r"\w+_residual fields.*teacher_items"):
        brain.unit_targets(without, n_frames)


def test_alignment_padding_is_masked_and_frames_match_the_encoder(tmp_path):
    data = _utterances()
    caches = _caches(tmp_path, data)
    brain = _brain(tmp_path, _hierarchy())
    batch = _batch(data, caches)
    n_frames = brain.compute_forward(batch, sb.Stage.TRAIN)["log_probs"].shape[1]
    assert n_frames == RATE.frames_for_samples(max(len(d["sig"]) for d in data))
    f2p = brain.unit_targets(batch, n_frames)["senone"].frame_to_position
    for row, item in enumerate(data):
        own = item["senone_frame_to_position"]
        assert torch.equal(f2p[row, : len(own)], own)
        assert torch.all(f2p[row, len(own):] == -1)  # collation padded with 0: now masked


def test_wrong_frame_rate_and_missing_fields_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="encoder frame rate"):
        fit_frames(torch.zeros(2, 40, dtype=torch.long), torch.ones(2), 10, ids=["u1", "u2"])
    data = _utterances()
    brain = _brain(tmp_path, _hierarchy())

    def objectives(batch):
        predictions = brain.compute_forward(batch, sb.Stage.TRAIN)
        return brain.compute_objectives(predictions, batch, sb.Stage.TRAIN)

    with pytest.raises(KeyError, match="No teacher for unit type 'monophone'"):
        objectives(PaddedBatch(data))
    no_senone = [{k: v for k, v in d.items() if not k.startswith("senone")} for d in data]
    caches = _caches(tmp_path, data)
    for item in no_senone:
        for unit_type in ("monophone", "subword"):
            probs, ids, rest = caches[unit_type].utterance(item["id"])
            item.update({f"{unit_type}_top_probs": probs, f"{unit_type}_top_ids": ids,
                         f"{unit_type}_residual": rest})
    with pytest.raises(KeyError, match="no fields senone_units / senone_frame_to_position for "
                                       "unit type 'senone'"):
        objectives(PaddedBatch(no_senone))


def test_one_epoch_with_dynamic_items_then_evaluation_without_teachers(tmp_path):
    data = _utterances(n=4)
    caches = _caches(tmp_path, data)
    items, keys = teacher_items(caches)
    train = DynamicItemDataset({d["id"]: {k: v for k, v in d.items() if k != "id"}
                                for d in data})
    for item in items:
        train.add_dynamic_item(item)
    unit_keys = [k for k in data[0] if k.endswith(("_units", "_frame_to_position"))]
    train.set_output_keys(["id", "sig", "wrd", "tokens", *unit_keys, *keys])
    # valid/test carry no units, alignments or teachers: evaluation is the plain AM
    valid = DynamicItemDataset({d["id"]: {k: d[k] for k in ("sig", "wrd", "tokens")}
                                for d in data})
    valid.set_output_keys(["id", "sig", "wrd", "tokens"])
    brain = _brain(tmp_path, _hierarchy(), moe=True)
    brain.checkpointer = sb.utils.checkpoints.Checkpointer(
        tmp_path / "save", recoverables={**brain.modules, "counter": brain.hparams.epoch_counter})
    brain.fit(brain.hparams.epoch_counter, train, valid,
              train_loader_kwargs={"batch_size": 2}, valid_loader_kwargs={"batch_size": 2})
    assert "loss_kd_subword" in brain.train_stats and "loss_moe" in brain.train_stats
    log = (tmp_path / "log.txt").read_text()
    assert "loss_kd_senone" in log and "WER" in log
    # The epoch's expert usage is logged per MoE layer, and drawn after the last epoch.
    assert "encoder.layers.layers.0.ffn_module1.1 entropy" in log and "usage max" in log
    assert (tmp_path / "expert_usage" / "train_expert_usage_layer_usage.png").is_file()
    brain.evaluate(valid, min_key="WER", test_loader_kwargs={"batch_size": 2})
    results = json.loads((tmp_path / "results.json").read_text())
    heads = sum(p.numel() for p in brain.modules["auxiliary_heads"].parameters())
    assert results["params"] == results["params_with_heads"] - heads > 0
    # The MoE Conformer's expert usage on the test utterances: both macaron FFNs of each layer
    usage = results["usage"]
    assert len(usage) == 6 and all(0 < sum(u) <= 1 + 1e-5 for u in usage.values())
    assert set(results["gate_entropy"]) == set(usage)
    assert 1 <= results["combinations_used"] <= results["num_combinations"] == 2 ** 6
    plots = sorted(p.name for p in (tmp_path / "expert_usage").iterdir())
    assert "expert_usage_layer_usage.png" in plots and "expert_usage.json" in plots


def _dataset_reading_caches(data, caches):
    """Units and alignments of ``data``; teachers read from ``caches`` by teacher_items."""
    dataset = DynamicItemDataset({d["id"]: {k: v for k, v in d.items() if k != "id"}
                                  for d in data})
    items, teacher_keys = teacher_items(caches)
    for item in items:
        dataset.add_dynamic_item(item)
    dataset.set_output_keys([k for k in data[0] if not k.endswith(("top_probs", "top_ids",
                                                                     "residual"))]
                            + teacher_keys)
    return dataset


@pytest.mark.parametrize("head_tau", [1.0, 2.0])
def test_a_head_trains_only_at_the_temperature_its_cache_was_built_at(tmp_path, head_tau):
    data = _utterances()
    caches = _caches(tmp_path, data, tau=2.0)
    heads = AuxiliaryHeads(
        senone=AuxiliaryHead("senone", 1, D, UNITS["senone"], tau=head_tau),
        # alpha 0 reads no teacher, so its tau is free
        monophone=AuxiliaryHead("monophone", 2, D, UNITS["monophone"], loss="frame_ce",
                                alpha=0.0, tau=5.0),
    )
    brain = _brain(tmp_path, heads, caches=caches)
    brain.checkpointer = sb.utils.checkpoints.Checkpointer(
        tmp_path / "save", recoverables={**brain.modules, "counter": brain.hparams.epoch_counter})
    dataset = _dataset_reading_caches(data, caches)
    before = {n: p.detach().clone() for n, p in brain.modules.named_parameters()}
    if head_tau != 2.0:
        with pytest.raises(CacheMismatchError) as refused:
            brain.fit(brain.hparams.epoch_counter, dataset, dataset,
                      train_loader_kwargs={"batch_size": 2},
                      valid_loader_kwargs={"batch_size": 2})
        message = str(refused.value)
        assert "'senone'" in message and str(tmp_path / "senone") in message
        assert "tau=1.0" in message and "temperature 2.0" in message
        assert brain.hparams.epoch_counter.current == 0  # refused before the first epoch
        assert all(torch.equal(p, before[n]) for n, p in brain.modules.named_parameters())
        return
    brain.fit(brain.hparams.epoch_counter, dataset, dataset,
              train_loader_kwargs={"batch_size": 2}, valid_loader_kwargs={"batch_size": 2})
    assert brain.hparams.epoch_counter.current == 1
    assert torch.isfinite(torch.tensor(brain.train_stats["loss_kd_senone"]))
    assert "loss_kd_monophone" not in brain.train_stats
    assert any(not torch.equal(p, before[n]) for n, p in brain.modules.named_parameters())


def test_label_interpolation_excludes_the_main_blank_by_default(tmp_path):
    brain = _brain(tmp_path, distillation=DistillationObjective(label_interpolation=0.3))
    assert brain.objective.main_blank_index == VOCAB


def _tokens_as_subwords(data):
    """The recipe's data: the subword units are the CTC targets (one tokenizer, one text),
    and their prep alignment spreads them over every frame after a leading silence."""
    for item in data:
        item["subword_units"] = item["tokens"].clone()
        f2p = item["subword_frame_to_position"]
        n_frames, n_units = len(f2p), len(item["tokens"])
        f2p[1:] = torch.arange(n_frames - 1) * n_units // (n_frames - 1)
    return data


def _condition_objective(name):
    """The DistillationObjective of a KD recipe condition: hparams/kd.yaml with the
    condition file's kd settings, blank = VOCAB."""
    from hyperpyyaml import load_hyperpyyaml

    from sb_crossmodal_kd.kd_recipe import condition_overrides

    kd = condition_overrides(name).get("kd", {})
    with open(Path(__file__).resolve().parents[1] / "hparams" / "kd.yaml") as handle:
        return load_hyperpyyaml(handle, {**kd, "main_blank_index": VOCAB})["distillation"]


def test_label_interpolation_condition_trains_one_epoch_on_ctc_frames(tmp_path):
    objective = _condition_objective("label_interpolation")
    assert objective.label_interpolation_frames == "ctc" and objective.label_interpolation > 0
    data = _tokens_as_subwords(_utterances(n=4))
    caches = _caches(tmp_path, data)
    items, keys = teacher_items({"subword": caches["subword"]})
    train = DynamicItemDataset({d["id"]: {k: v for k, v in d.items() if k != "id"}
                                for d in data})
    for item in items:
        train.add_dynamic_item(item)
    train.set_output_keys(["id", "sig", "wrd", "tokens", "subword_units",
                           "subword_frame_to_position", *keys])
    brain = _brain(tmp_path, distillation=objective)
    brain.checkpointer = sb.utils.checkpoints.Checkpointer(
        tmp_path / "save", recoverables={**brain.modules, "counter": brain.hparams.epoch_counter})
    before = {n: p.detach().clone() for n, p in brain.modules.named_parameters()}
    brain.fit(brain.hparams.epoch_counter, train, train,
              train_loader_kwargs={"batch_size": 2}, valid_loader_kwargs={"batch_size": 2})
    assert brain.hparams.epoch_counter.current == 1
    assert {k for k in brain.train_stats if k.startswith("loss_")} == {
        "loss_main", "loss_li_main", "loss_total"}
    assert torch.isfinite(torch.tensor(brain.train_stats["loss_li_main"]))
    assert any(not torch.equal(p, before[n]) for n, p in brain.modules.named_parameters())


def test_ctc_frames_come_from_the_main_output_the_ctc_targets_and_the_ctc_lengths(tmp_path):
    from sb_crossmodal_kd.alignment.ctc import ctc_frame_positions
    from sb_crossmodal_kd.losses import label_interpolation_loss

    data = _tokens_as_subwords(_utterances(n=4))
    caches = _caches(tmp_path, data)
    objective = DistillationObjective(0.3, main_blank_index=VOCAB,
                                      label_interpolation_frames="ctc")
    brain = _brain(tmp_path, distillation=objective)
    batch = _batch(data, caches)
    with torch.no_grad():  # the step's own forward pass: no dropout, no augmentation here
        predictions = brain.compute_forward(batch, sb.Stage.TRAIN)
        targets = brain.unit_targets(batch, predictions["log_probs"].shape[1])["subword"]
    log_probs, lengths = predictions["log_probs"], predictions["lengths"]
    tokens, token_lens = batch.tokens
    positions = ctc_frame_positions(log_probs, tokens, lengths, token_lens, VOCAB,
                                    backend="viterbi")
    assert (positions >= 0).any() and (positions == -1).any()
    ctc_li = label_interpolation_loss(log_probs, targets.units, positions, targets.teacher, 0.3,
                                      lengths=lengths, blank_index=VOCAB).item()
    aligned_li = label_interpolation_loss(log_probs, targets.units, targets.frame_to_position,
                                          targets.teacher, 0.3, lengths=lengths,
                                          blank_index=VOCAB).item()
    assert abs(ctc_li - aligned_li) > 1e-3  # the two variants differ on this batch
    _train_step(brain, batch)
    assert brain.train_stats["loss_li_main"] == pytest.approx(ctc_li, abs=2e-5)


def test_ctc_frames_refuse_ctc_targets_that_are_not_the_subword_units(tmp_path):
    data = _utterances()  # tokens drawn apart from the subword units
    caches = _caches(tmp_path, data)
    brain = _brain(tmp_path, distillation=DistillationObjective(
        0.3, label_interpolation_frames="ctc"))
    batch = _batch(data, caches)
    predictions = brain.compute_forward(batch, sb.Stage.TRAIN)
    with pytest.raises(ValueError, match="differ from the 'subword' unit sequences"):
        brain.compute_objectives(predictions, batch, sb.Stage.TRAIN)


def test_the_units_collate_pads_frame_keys_with_minus_one_and_gives_the_same_targets(tmp_path):
    from sb_crossmodal_kd.units.pipeline import unit_collate

    data = _utterances()
    caches = _caches(tmp_path, data)
    for item in data:
        for unit_type, cache in caches.items():
            probs, ids, rest = cache.utterance(item["id"])
            item.update({f"{unit_type}_top_probs": probs, f"{unit_type}_top_ids": ids,
                         f"{unit_type}_residual": rest})
    brain = _brain(tmp_path, _hierarchy())
    reference = _brain(tmp_path, _hierarchy())
    plain, piped = _batch(data, caches), unit_collate()(data)
    assert piped.senone_frame_to_position.data.min() == -1
    n_frames = brain.compute_forward(plain, sb.Stage.TRAIN)["log_probs"].shape[1]
    a = reference.unit_targets(plain, n_frames)
    b = brain.unit_targets(piped, n_frames)
    for unit_type in UNITS:
        assert torch.equal(a[unit_type].units, b[unit_type].units)
        assert torch.equal(a[unit_type].frame_to_position, b[unit_type].frame_to_position)
        assert torch.equal(a[unit_type].teacher[1], b[unit_type].teacher[1])


def test_head_accuracy_counts_aligned_frames_only(tmp_path):
    from sb_crossmodal_kd.losses import UnitTargets

    heads = AuxiliaryHeads(sub=AuxiliaryHead("subword", 1, D, 4, loss="ctc"))
    brain = _brain(tmp_path, heads)
    # frames: unit 1 (right), unit 2 (wrong: guesses 0), no unit (ignored, guesses blank)
    logits = torch.tensor([[[0.0, 5.0, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0, 0.0],
                            [0.0, 0.0, 0.0, 0.0, 9.0]]])
    targets = {"subword": UnitTargets(torch.tensor([[1, 2]]), torch.ones(1),
                                      torch.tensor([[0, 1, -1]]))}
    accuracy = brain.head_accuracies({"sub": logits}, targets)
    assert accuracy["acc_sub"].item() == pytest.approx(0.5)


def test_one_epoch_from_wav_files_unit_store_and_teacher_caches(tmp_path):
    """The real data path: wav files, a UnitStore read by the units pipeline (its -1
    padding), teacher caches built from the store's sequences, read by teacher_items in the
    loader."""
    import soundfile

    from sb_crossmodal_kd.units.pipeline import add_unit_pipelines, unit_collate, unit_keys
    from sb_crossmodal_kd.units.store import UnitStoreWriter

    data = _utterances(n=4)
    store_path = tmp_path / "train.units"
    with UnitStoreWriter(store_path, {"lexicon": "l", "tokenizer": "t", "tree": "r"}) as w:
        for item in data:
            streams = {}
            for unit_type in UNITS:
                f2p = item[f"{unit_type}_frame_to_position"]
                units = item[f"{unit_type}_units"]
                streams[f"{unit_type}.units"] = units.numpy()
                streams[f"{unit_type}.frame_to_position"] = f2p.numpy()
                streams[f"{unit_type}.frame_labels"] = torch.where(
                    f2p >= 0, units[f2p.clamp(min=0)], -1).numpy()
            w.add(item["id"], streams)
    manifest = {}
    for item in data:
        wav = tmp_path / f"{item['id']}.wav"
        soundfile.write(wav, item["sig"].numpy(), 16000)
        manifest[item["id"]] = {"wav": str(wav), "wrd": item["wrd"]}
    caches = {}
    for unit_type in UNITS:
        teacher = ShiftTeacher(vocab_size=UNITS[unit_type], name="shift", unit_type=unit_type)
        sequences = [(d["id"], d[f"{unit_type}_units"].tolist()) for d in data]
        build_cache(teacher, sequences, tmp_path / unit_type, k=3, progress=False)
        caches[unit_type] = TeacherCache(tmp_path / unit_type, vocab_size=UNITS[unit_type])

    dataset = DynamicItemDataset(manifest)
    add_unit_pipelines([dataset], [store_path], unit_types=list(UNITS))
    items, teacher_keys = teacher_items(caches)
    for item in items:
        dataset.add_dynamic_item(item)

    @sb.utils.data_pipeline.takes("wav", "wrd")
    @sb.utils.data_pipeline.provides("sig", "tokens")
    def audio(wav, wrd):
        yield sb.dataio.dataio.read_audio(wav)
        yield torch.tensor([1, 2])

    dataset.add_dynamic_item(audio)
    dataset.set_output_keys(["id", "sig", "wrd", "tokens", *unit_keys(UNITS),
                             *teacher_keys])
    brain = _brain(tmp_path, _hierarchy(), moe=True)
    brain.checkpointer = sb.utils.checkpoints.Checkpointer(
        tmp_path / "save", recoverables={**brain.modules, "counter": brain.hparams.epoch_counter})
    loader = {"batch_size": 2, "collate_fn": unit_collate()}
    brain.fit(brain.hparams.epoch_counter, dataset, dataset, train_loader_kwargs=loader,
              valid_loader_kwargs=loader)
    stats = brain.train_stats
    assert all(f"loss_kd_{head}" in stats for head in ("senone", "monophone", "subword"))
    assert all(torch.isfinite(torch.tensor(v)) for k, v in stats.items() if k != "epoch_s")


def test_a_schedule_left_without_its_length_stops_before_training(tmp_path):
    from speechbrain.nnet.schedulers import LinearWarmupScheduler

    from sb_crossmodal_kd.experiment import fill_schedule_length

    data = _utterances(n=4)
    train = DynamicItemDataset({d["id"]: {k: d[k] for k in ("sig", "wrd", "tokens")}
                                for d in data})
    train.set_output_keys(["id", "sig", "wrd", "tokens"])
    brain = _brain(tmp_path)
    brain.hparams.lr_annealing = LinearWarmupScheduler(0.1, 1, None)
    before = [p.detach().clone() for p in brain.modules.parameters()]
    with pytest.raises(ValueError, match="num_training_steps: null"):
        brain.fit(brain.hparams.epoch_counter, train, None, train_loader_kwargs={"batch_size": 2})
    assert all(torch.equal(a, b) for a, b in zip(before, brain.modules.parameters(), strict=True))
    fill_schedule_length(brain.hparams.lr_annealing, {"batch_size": 2}, train, epochs=1)
    brain.fit(brain.hparams.epoch_counter, train, None, train_loader_kwargs={"batch_size": 2})
    assert brain.hparams.lr_annealing.current_step == 2  # two batches: the rate ends at 0
    assert brain.optimizer.param_groups[0]["lr"] == 0.0


class _RecipeBrain(sb.Brain):
    """A Brain as SpeechBrain recipes write them: tuple predictions, its own CTC loss. With
    ``doubled`` its augmentation concatenates the batch with a copy (SpeechBrain's
    Augmenter with ``concat_original``) and repeats the labels to match."""

    doubled = False

    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        wavs, lens = batch.sig
        if self.doubled:
            wavs, lens = torch.cat([wavs, wavs]), torch.cat([lens, lens])
        encoded = self.modules.encoder(self.modules.compute_features(wavs), lens)
        return self.hparams.log_softmax(self.modules.ctc_lin(encoded)), lens

    def compute_objectives(self, predictions, batch, stage):
        log_probs, lens = predictions
        tokens, token_lens = batch.tokens
        if self.doubled:
            tokens, token_lens = torch.cat([tokens, tokens]), torch.cat([token_lens, token_lens])
        return sb.nnet.losses.ctc_loss(log_probs, tokens, lens, token_lens, VOCAB)


class _KDRecipeBrain(KDMixin, _RecipeBrain):
    pass


def _recipe_brain(tmp_path, caches, doubled):
    torch.manual_seed(0)
    encoder = ConformerCTCEncoder(n_mels=20, d_model=D, num_layers=3, nhead=2, d_ffn=32,
                                  kernel_size=3, front_channels=(4, 4), dropout=0.0)
    use_moe_ffn(encoder.layers, num_experts=2, top_k=1, load_balancing_weight=0.01)
    modules = {"compute_features": Fbank(n_mels=20), "encoder": encoder,
               "ctc_lin": torch.nn.Linear(D, VOCAB + 1), "auxiliary_heads": _hierarchy()}
    hparams = {"log_softmax": Softmax(apply_log=True), "teacher_caches": caches,
               "epoch_counter": sb.utils.epoch_loop.EpochCounter(1),
               "output_folder": str(tmp_path)}
    brain = _KDRecipeBrain(modules=modules, opt_class=lambda p: torch.optim.SGD(p, lr=0.1),
                           hparams=hparams, run_opts={"device": "cpu"})
    brain.doubled = doubled
    return brain


def test_the_mixin_adds_heads_and_moe_terms_to_a_recipe_brain_even_on_doubled_batches(tmp_path):
    # A recipe's own Brain, unchanged, gets every head's and the MoE term on top of its
    # CTC loss; when its augmentation doubles the batch, the targets follow, and each term
    # is what it is on the batch alone (a copy adds nothing to a mean).
    data = _utterances()
    caches = _caches(tmp_path, data)
    terms = {}
    for doubled in (False, True):
        brain = _recipe_brain(tmp_path / str(doubled), caches, doubled)
        brain.on_stage_start(sb.Stage.TRAIN, epoch=1)
        batch = _batch(data, caches)
        loss = brain.compute_objectives(brain.compute_forward(batch, sb.Stage.TRAIN), batch,
                                        sb.Stage.TRAIN)
        assert torch.isfinite(loss)
        terms[doubled] = brain.loss_terms()
    assert set(terms[False]) >= {"loss_main", "loss_kd_senone", "loss_kd_monophone",
                                 "loss_kd_subword", "loss_ctc_subword", "loss_moe"}
    assert terms[False]["loss_moe"] > 0
    for name, value in terms[False].items():
        assert terms[True][name] == pytest.approx(value, rel=1e-3, abs=1e-5), name
