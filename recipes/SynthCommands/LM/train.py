#!/usr/bin/env python3
"""Trains a causal LM over one unit type (subword, monophone or senone) on text only.

    python train.py hparams/subword.yaml   --data_folder DATA
    python train.py hparams/monophone.yaml --data_folder DATA
    python train.py hparams/senone.yaml    --data_folder DATA --tree_file TREE.json

DATA is a SynthCommands corpus (``sbkd corpus --output DATA``); its text-only corpus
``DATA/lm_text/{train,valid}.txt`` (one sentence per line) is converted to units by the yaml's
``text_units`` and the LM (SpeechBrain RNNLM or TransformerLM inside
``sb_crossmodal_kd.teachers.unit_lm.UnitLM``) is trained on it. Any other one-sentence-per-line
text works: set ``train_text`` / ``valid_text``.

Outputs in ``<output_folder>``: ``lm/`` (the teacher: ``hyperparams.yaml`` + ``lm.ckpt``,
loadable with SpeechBrain's Pretrainer, e.g. by ``sbkd teacher-cache --teacher``),
``results.json`` (held-out perplexity, EOS included, and counts), ``train_log.txt``.
"""

import sys

from sb_crossmodal_kd.distributed import finish_process
from sb_crossmodal_kd.teachers.lm_training import main

if __name__ == "__main__":
    main(sys.argv[1:])
    finish_process()  # under torchrun: exit without gloo's teardown
