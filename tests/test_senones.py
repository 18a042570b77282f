"""Senone tree: splits on a planted contextual effect, maps unseen contexts, saves and loads."""

import numpy as np
import pytest
import torch

from sb_crossmodal_kd.units.phones import PHONES
from sb_crossmodal_kd.units.senones import SenoneTree, TriphoneStats


def _planted_stats(seed=0):
    """AA's middle state is shifted by +3 after a nasal; everything else is plain noise."""
    gen = torch.Generator().manual_seed(seed)
    stats = TriphoneStats(dim=4)
    for left in ["M", "N", "B", "D", "L", "S", "T"]:
        for right in ["K", "P"]:
            for _ in range(4):
                feats = torch.randn(30, 4, generator=gen)
                if left in ("M", "N"):
                    feats[10:20] += 3.0  # frames 10..19 are the middle state of 30
                phones = ["IY", left, "AA", right]
                labels = [0] * 5 + [1] * 5 + [2] * 30 + [3] * 5
                all_feats = torch.cat([torch.randn(10, 4, generator=gen), feats,
                                       torch.randn(5, 4, generator=gen)])
                stats.add(phones, labels, all_feats)
    return stats


def test_tree_splits_on_planted_context_and_maps_unseen_contexts():
    tree = SenoneTree.build(_planted_stats(), max_leaves=400, min_count=10, min_gain=30.0)
    root = tree.trees["AA/1"]
    assert root.get("side") == "L" and root.get("question") == "nasal", root
    # The unplanted states did not split.
    assert "leaf" in tree.trees["AA/0"] and "leaf" in tree.trees["AA/2"]
    nasal = tree.senone("M", "AA", "K", 1)
    assert tree.senone("N", "AA", "P", 1) == nasal
    assert tree.senone("NG", "AA", "T", 1) == nasal  # NG and T never seen
    assert tree.senone("Z", "AA", "T", 1) == tree.senone("S", "AA", "K", 1) != nasal
    # Text alone yields senones: 3 per phone, silence states are 0, 1, 2, all ids in range.
    seq = tree.senones(["sil", "NG", "AA", "ZH", "sil"])
    assert len(seq) == 15 and seq[:3] == [0, 1, 2] and seq[-3:] == [0, 1, 2]
    assert seq[7] == nasal
    every = {tree.senone(a, p, b, s) for a in PHONES for p in PHONES for b in ("sil", "K")
             for s in range(3)}
    assert every == set(range(tree.num_senones))
    assert tree.depth >= 1


def test_max_leaves_and_min_gain_stop_growth():
    stats = _planted_stats()
    untied = 3 * len(PHONES)
    assert SenoneTree.build(stats, max_leaves=untied, min_gain=1.0).num_senones == untied
    assert SenoneTree.build(stats, max_leaves=400, min_gain=1e9).num_senones == untied
    with pytest.raises(ValueError, match="max_leaves=10"):
        SenoneTree.build(stats, max_leaves=10)


def test_save_load_round_trip(tmp_path):
    tree = SenoneTree.build(_planted_stats(), max_leaves=400, min_count=10, min_gain=30.0)
    tree.save(str(tmp_path / "tree.json"))
    loaded = SenoneTree.load(str(tmp_path / "tree.json"))
    assert loaded.hash == tree.hash and loaded.num_senones == tree.num_senones
    phones = ["sil", "M", "AA", "K", "N", "AA", "P", "sil"]
    assert loaded.senones(phones) == tree.senones(phones)


def test_frame_senones_follow_the_phone_alignment():
    tree = SenoneTree.build(_planted_stats(), max_leaves=400, min_count=10, min_gain=30.0)
    phones = ["sil", "M", "AA", "sil"]
    labels = np.array([0] * 4 + [1] * 6 + [2] * 9 + [3] * 2 + [-1] * 3)
    senones, positions = tree.frame_senones(phones, labels)
    seq = tree.senones(phones)
    assert positions[:4].tolist() == [0, 0, 1, 2]
    assert positions[10:19].tolist() == [6, 6, 6, 7, 7, 7, 8, 8, 8]
    assert positions[-3:].tolist() == [-1, -1, -1] and senones[-3:].tolist() == [-1, -1, -1]
    assert senones[:21].tolist() == [seq[p] for p in positions[:21]]
