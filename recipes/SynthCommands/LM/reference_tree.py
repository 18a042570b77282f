#!/usr/bin/env python3
"""Builds a senone tree from a SynthCommands corpus's reference (synthesiser) phone timings.

    python reference_tree.py --data_folder DATA --output TREE.json [--max_leaves 500]

A stand-in for the senone LM recipe on the embedded corpus: the tree's frame statistics come
from the synthesiser's own phone segments and 80-dim Fbank features, not from a forced
alignment (on a real corpus, build the tree from the aligner's output instead). The tree is
:class:`sb_crossmodal_kd.units.senones.SenoneTree`, the same tying the rest of the package uses.
"""

import argparse
import csv
import json

import torch
from speechbrain.lobes.features import Fbank
from tqdm import tqdm

from sb_crossmodal_kd.alignment.framerate import FrameRate
from sb_crossmodal_kd.data.audio import load_audio
from sb_crossmodal_kd.units.senones import SenoneTree, TriphoneStats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_folder", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--split", default="train")
    parser.add_argument("--max_leaves", type=int, default=500)
    parser.add_argument("--min_count", type=int, default=20)
    parser.add_argument("--min_gain", type=float, default=50.0)
    args = parser.parse_args(argv)

    with open(f"{args.data_folder}/{args.split}_alignments.json", encoding="utf-8") as handle:
        alignments = json.load(handle)
    with open(f"{args.data_folder}/{args.split}.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    fbank, rate, stats = Fbank(n_mels=80), FrameRate(), TriphoneStats(dim=80)
    for row in tqdm(rows, desc="triphone statistics"):
        segments = alignments[row["ID"]]["phones"]
        waveform = load_audio(row["wav"], rate.sample_rate)
        with torch.no_grad():
            features = fbank(waveform.unsqueeze(0))[0]
        labels = rate.segments_to_frames(
            [(i, start, end) for i, (_, start, end) in enumerate(segments)],
            n_frames=features.shape[0], shift_s=rate.feature_shift_s,
        )
        stats.add([phone for phone, _, _ in segments], labels, features)
    tree = SenoneTree.build(stats, max_leaves=args.max_leaves, min_count=args.min_count,
                            min_gain=args.min_gain)
    tree.save(args.output)
    print(json.dumps({"senones": tree.num_senones, "depth": tree.depth, "hash": tree.hash,
                      "frames": stats.frames}))


if __name__ == "__main__":
    main()
