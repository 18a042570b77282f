"""Teacher language models over unit vocabularies, and the teacher cache.

- :mod:`~sb_crossmodal_kd.teachers.base`: the one interface (per-position distributions,
  the top-k triple, the top-k KL);
- :mod:`~sb_crossmodal_kd.teachers.unit_lm`: causal LMs over senones, monophones or subwords
  trained here on text;
- :mod:`~sb_crossmodal_kd.teachers.speechbrain_lm`: any SpeechBrain LM through its hparams
  and Pretrainer;
- :mod:`~sb_crossmodal_kd.teachers.hf`: transformers causal (GPT-2 style) and masked (BERT
  style) LMs;
- :mod:`~sb_crossmodal_kd.teachers.cache`: precomputed top-k distributions on disk.
"""

import os

TEACHER_KINDS = ("auto", "speechbrain", "hf-causal", "hf-masked")


def load_teacher(source, kind="auto", **kwargs):
    """Loads a teacher from a local folder.

    Arguments
    ---------
    source : str or path
        A SpeechBrain LM folder (``hyperparams.yaml`` + checkpoints; this package's unit LMs
        are such folders) or a transformers folder (``config.json`` + weights).
    kind : str
        ``"speechbrain"``, ``"hf-causal"``, ``"hf-masked"`` or ``"auto"``: a folder with
        ``hyperparams.yaml`` is a SpeechBrain LM; with ``config.json``, a masked LM when its
        ``architectures`` name one (``...ForMaskedLM``), a causal LM otherwise.
    **kwargs
        Passed to the adapter's loader (e.g. ``vocab_size``, ``excluded_units``).
    """
    if kind not in TEACHER_KINDS:
        raise ValueError(f"teacher kind must be one of {TEACHER_KINDS}, got {kind!r}")
    source = str(source)
    if not os.path.isdir(source):
        raise FileNotFoundError(f"teacher folder {source!r} does not exist")
    if kind == "auto":
        if os.path.isfile(os.path.join(source, "hyperparams.yaml")):
            kind = "speechbrain"
        elif os.path.isfile(os.path.join(source, "config.json")):
            import json

            with open(os.path.join(source, "config.json"), encoding="utf-8") as handle:
                architectures = json.load(handle).get("architectures") or []
            masked = any("MaskedLM" in name for name in architectures)
            kind = "hf-masked" if masked else "hf-causal"
        else:
            raise ValueError(
                f"{source} has neither hyperparams.yaml (SpeechBrain LM) nor config.json "
                "(transformers LM); pass the folder of a saved LM"
            )
    if kind == "speechbrain":
        from sb_crossmodal_kd.teachers.speechbrain_lm import SpeechBrainLMTeacher

        return SpeechBrainLMTeacher.from_hparams(source, **kwargs)
    from sb_crossmodal_kd.teachers.hf import HFCausalLMTeacher, HFMaskedLMTeacher

    adapter = HFMaskedLMTeacher if kind == "hf-masked" else HFCausalLMTeacher
    return adapter.from_pretrained(source, **kwargs)
