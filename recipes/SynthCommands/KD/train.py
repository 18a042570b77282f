#!/usr/bin/env python3
"""Baseline recipe: Conformer CTC over SentencePiece subwords on SynthCommands.

    python synthcommands_prepare.py --output DATA      # or: sbkd corpus --output DATA
    python train.py hparams/conformer_ctc.yaml --data_folder DATA

Any SpeechBrain CSV manifest (ID, duration, wav, wrd) works too: pass --train_csv,
--valid_csv and --test_csv. Test WER/CER go to <output_folder>/results.json.
"""

import sys

from sb_crossmodal_kd.distributed import finish_process
from sb_crossmodal_kd.experiment import main

if __name__ == "__main__":
    main(sys.argv[1:])
    finish_process()  # under torchrun: exit without gloo's teardown
