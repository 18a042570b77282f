#!/usr/bin/env python3
"""One KD condition (recipes/SynthCommands/KD) on LibriSpeech.

    python librispeech_prepare.py --data_folder LS --output OUT --lm_text librispeech-lm-norm.txt
    python train.py hparams/kd.yaml --condition hierarchy --prep_folder OUT/prep

Conditions: am_alone, label_interpolation, aux_subword, hierarchy, hierarchy_minus_senone,
hierarchy_minus_monophone, hierarchy_minus_subword, and each with _moe. Test WER/CER go to
<output_folder>/results.json.
"""

import sys

from sb_crossmodal_kd.distributed import finish_process
from sb_crossmodal_kd.kd_recipe import main

if __name__ == "__main__":
    main(sys.argv[1:])
    finish_process()  # under torchrun: exit without gloo's teardown
