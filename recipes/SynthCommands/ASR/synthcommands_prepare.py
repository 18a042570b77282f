#!/usr/bin/env python3
"""Makes the SynthCommands corpus (speech, manifests, alignments, LM text) in a folder.

    python synthcommands_prepare.py --output DATA [--n_train 1200 --seed 1234 ...]

Same as `sbkd corpus`; re-running skips what is complete and never overwrites a corpus made
with other settings.
"""

import sys

from sb_crossmodal_kd.commands.corpus import main

if __name__ == "__main__":
    main(sys.argv[1:])
