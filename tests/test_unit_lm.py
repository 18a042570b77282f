"""Unit LMs: training on unit text lowers perplexity; the exported folder loads through
SpeechBrain's Pretrainer and gives the trained model's distributions."""

import random

import pytest
import torch

from sb_crossmodal_kd.teachers.lm_training import dataset
from sb_crossmodal_kd.teachers.unit_lm import (
    BOUNDARY_INDEX,
    UNIT_OFFSET,
    UnitLM,
    UnitLMBrain,
    export_unit_lm,
    load_unit_lm_teacher,
    perplexity,
)
from sb_crossmodal_kd.units.types import TextUnits

V = 8


def _counting_language(n, seed):
    """Sentences that count upwards mod V from a random start: each next unit is certain."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start, length = rng.randrange(V), rng.randint(3, 6)
        out.append([(start + i) % V for i in range(length)])
    return out


def test_brain_training_lowers_held_out_perplexity(tmp_path):
    torch.manual_seed(0)
    lm = UnitLM(V, architecture="lstm", embedding_dim=16, hidden_size=32, num_layers=1,
                dropout=0.0)
    held_out = _counting_language(40, seed=2)
    before = perplexity(lm, held_out)
    brain = UnitLMBrain(
        modules={"lm_model": lm},
        opt_class=lambda params: torch.optim.Adam(params, lr=0.02),
        run_opts={"device": "cpu"},
        checkpointer=None,
    )
    brain.fit(range(6), dataset(_counting_language(300, seed=1)), dataset(held_out),
              train_loader_kwargs={"batch_size": 16, "shuffle": True},
              valid_loader_kwargs={"batch_size": 32})
    after = perplexity(lm, held_out)
    assert before > V / 2  # untrained: about uniform over V units + boundary
    # Only the start and the length are uncertain: log(V) + log(4) nats per sentence of ~5.5
    # targets gives a floor of about 1.6.
    assert after < 2.2, (before, after)


@pytest.mark.parametrize("architecture", ["lstm", "transformer"])
def test_export_loads_through_pretrainer_and_matches_the_model(tmp_path, architecture):
    torch.manual_seed(0)
    lm = UnitLM(V, architecture=architecture, embedding_dim=16, hidden_size=32, num_layers=2,
                dropout=0.0, nhead=2).eval()
    export_unit_lm(tmp_path / "lm", lm, unit_type="monophone", tokenizer_hash="lex:1",
                   extra={"valid_ppl": 3.5})
    teacher = load_unit_lm_teacher(tmp_path / "lm")
    assert (teacher.vocab_size, teacher.unit_type, teacher.tokenizer_hash) == (V, "monophone",
                                                                               "lex:1")
    sequences = [[3, 4, 5, 6], [0, 7]]
    unit_ids = torch.tensor([[3, 4, 5, 6], [0, 7, 0, 0]])
    probs = teacher(unit_ids, torch.tensor([1.0, 0.5]), tau=1.3)
    for row, sequence in enumerate(sequences):
        tokens = torch.tensor([[BOUNDARY_INDEX] + [u + UNIT_OFFSET for u in sequence[:-1]]])
        with torch.no_grad():
            logits = lm(tokens)[0, :, UNIT_OFFSET:]
        expected = torch.softmax(logits / 1.3, dim=-1)
        torch.testing.assert_close(probs[row, : len(sequence)], expected, atol=1e-5, rtol=1e-4)


def test_text_units_for_senones_follow_the_tree():
    from sb_crossmodal_kd.units.lexicon import Lexicon
    from sb_crossmodal_kd.units.senones import SenoneTree, TriphoneStats

    lexicon = Lexicon({"turn": [["T", "ER1", "N"]], "on": [["AA1", "N"]]}, name="toy")
    stats = TriphoneStats(dim=2)
    generator = torch.Generator().manual_seed(0)
    stats.add(["T", "ER", "N"], [0] * 9 + [1] * 9 + [2] * 9, torch.randn(27, 2, generator=generator))
    tree = SenoneTree.build(stats, max_leaves=200, min_count=2, min_gain=1.0)
    senones = TextUnits("senone", lexicon=lexicon, tree=tree)
    ids = senones("turn on")
    assert ids == tree.senones(["T", "ER", "N", "AA", "N"]) and len(ids) == 15
    assert max(ids) < senones.vocab_size == tree.num_senones
    assert tree.hash in senones.hash and lexicon.hash in senones.hash
    with pytest.raises(ValueError, match="tree"):
        TextUnits("senone", lexicon=lexicon)


def test_lm_recipe_trains_and_exports_a_loadable_teacher(tmp_path):
    import importlib.util
    import json
    import pathlib

    from sb_crossmodal_kd.teachers import load_teacher

    recipe = pathlib.Path(__file__).parents[1] / "recipes" / "SynthCommands" / "LM"
    spec = importlib.util.spec_from_file_location("lm_recipe_train", recipe / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)

    (tmp_path / "data" / "lm_text").mkdir(parents=True)
    sentences = ["turn on the kitchen lights", "turn off the oven", "set a timer for ten minutes",
                 "what is the weather in boston", "play some jazz music"]
    (tmp_path / "data" / "lm_text" / "train.txt").write_text("\n".join(sentences * 8) + "\n")
    (tmp_path / "data" / "lm_text" / "valid.txt").write_text("\n".join(sentences[:3]) + "\n")
    out = tmp_path / "run"
    train.main([str(recipe / "hparams" / "subword.yaml"), "--data_folder",
                str(tmp_path / "data"), "--output_folder", str(out), "--number_of_epochs", "1",
                "--vocab_size", "30", "--device", "cpu"])
    results = json.loads((out / "results.json").read_text())
    assert results["unit_type"] == "subword" and results["vocab_size"] == 30
    assert 1.0 < results["valid_ppl"] < 40.0
    teacher = load_teacher(out / "lm")
    assert teacher.vocab_size == 30 and teacher.tokenizer_hash == results["units_hash"]
