#!/usr/bin/env python3
"""Frame-level monophone classification on TIMIT: Deep MoE vs dense MLP vs single-layer MoE.

The SynthCommands frame recipe (``recipes/SynthCommands/frame_classification/train.py``)
run on TIMIT's hand-labelled segmentation; the hparams here include that recipe's and change
only the data and output folders.

    python ../timit_prepare.py --data_folder /path/to/TIMIT --save_folder DATA
    python train.py hparams/dmoe.yaml --data_folder DATA
    python train.py hparams/dense_mlp.yaml --data_folder DATA
    python train.py hparams/moe_single.yaml --data_folder DATA
"""

import importlib.util
from pathlib import Path

FRAME_RECIPE = Path(__file__).resolve().parents[2] / "SynthCommands/frame_classification/train.py"


def load_frame_recipe():
    """The SynthCommands frame recipe's ``train.py`` as a module (recipes are not packages)."""
    spec = importlib.util.spec_from_file_location("frame_classification_train", FRAME_RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    from sb_crossmodal_kd.distributed import finish_process

    load_frame_recipe().main()
    finish_process()  # under torchrun: exit without gloo's teardown
