"""The KD conditions on any corpus: the ``train.py`` of ``recipes/Manifest`` and
``recipes/LibriSpeech`` (and of any corpus recipe built the same way).

A corpus recipe has one hparams file that includes the KD recipe's ``base.yaml`` with the
corpus's paths and sizes (``experiment: !include:../../SynthCommands/KD/hparams/base.yaml``).
``--condition NAME`` then applies one condition of the ablation
(:data:`~sb_crossmodal_kd.ablation.CONDITIONS`), read from that condition's own file in
``recipes/SynthCommands/KD/hparams``, so every condition is defined once::

    python train.py hparams/kd.yaml --condition hierarchy --prep_folder PREP
    python train.py hparams/kd.yaml --condition hierarchy_moe --prep_folder PREP \\
        --heads "{subword_alpha: 1.0}"

Other overrides apply on top of the condition's (nested ones merged key by key).
"""

import logging
import sys

import ruamel.yaml
import speechbrain as sb

from sb_crossmodal_kd.ablation import CONDITIONS, condition_recipe
from sb_crossmodal_kd.distributed import init_distributed
from sb_crossmodal_kd.experiment import WRAPPER_KEY, run_asr_experiment

logger = logging.getLogger(__name__)

__all__ = ["condition_overrides", "merge_overrides", "main"]


def _plain(node):
    """A ruamel node as plain dicts, lists and scalars."""
    if isinstance(node, dict):
        return {str(key): _plain(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_plain(value) for value in node]
    if isinstance(node, bool) or node is None:
        return node
    for kind in (int, float, str):
        if isinstance(node, kind):
            return kind(node)
    raise TypeError(f"condition files hold plain values only, got {node!r}")


def condition_overrides(name):
    """What condition ``name`` changes in ``base.yaml``, read from its hparams file.

    Example
    -------
    >>> overrides = condition_overrides("aux_subword_moe")
    >>> overrides["heads"], overrides["condition"], overrides["use_moe"]
    ({'senone_head': None, 'monophone_head': None}, 'aux_subword_moe', True)
    >>> condition_overrides("hierarchy")
    {'condition': 'hierarchy', 'use_moe': False}
    """
    path, extra = condition_recipe(name)
    with open(path, encoding="utf-8") as handle:
        content = ruamel.yaml.YAML().load(handle)
    if list(content or {}) != [WRAPPER_KEY]:
        raise ValueError(f"{path}: a condition file holds one key, {WRAPPER_KEY}: !include:...")
    return {**_plain(content[WRAPPER_KEY]), **extra}


def merge_overrides(base, extra):
    """``base`` updated with ``extra``; dicts present in both are merged key by key.

    Example
    -------
    >>> merge_overrides({"heads": {"senone_head": None}, "seed": 1},
    ...                 {"heads": {"subword_alpha": 1.0}, "seed": 2})
    {'heads': {'senone_head': None, 'subword_alpha': 1.0}, 'seed': 2}
    """
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(merged.get(key), dict) and isinstance(value, dict):
            merged[key] = merge_overrides(merged[key], value)
        else:
            merged[key] = value
    return merged


def main(argv=None):
    """``train.py hparams.yaml --condition NAME [--overrides...]``: trains and tests one KD
    condition on the corpus of ``hparams.yaml``; returns the results dict."""
    hparams_file, run_opts, overrides = sb.parse_arguments(
        sys.argv[1:] if argv is None else argv)
    overrides = dict(ruamel.yaml.YAML().load(overrides) or {}) if overrides else {}
    name = overrides.pop("condition", None)
    if name is None:
        raise SystemExit(f"Give the KD condition: --condition NAME, one of {', '.join(CONDITIONS)}")
    overrides = merge_overrides(condition_overrides(str(name)), overrides)
    run_opts = init_distributed(run_opts)  # under torchrun: gloo on CPU, nccl on GPUs
    results = run_asr_experiment(hparams_file, overrides, run_opts)
    logger.info("%s: test WER %.2f%%, CER %.2f%%", name, results["wer"], results["cer"])
    return results
