"""The data chain of hierarchical distillation, one idea per module.

- :mod:`~sb_crossmodal_kd.prep.settings`: the chain's settings and their defaults;
- :mod:`~sb_crossmodal_kd.prep.provenance`: the record of what a folder was built from,
  refusing other settings (the chain's, a corpus's, a recipe's manifests', an ablation run's);
- :mod:`~sb_crossmodal_kd.prep.record`: ``prep.json``, what a prep folder was built from,
  and the values hparams read of a prepared folder;
- :mod:`~sb_crossmodal_kd.prep.manifests`: a corpus's manifests, checked and imported;
- :mod:`~sb_crossmodal_kd.prep.lm_text`: the unit LMs' text, sampled from a large file;
- :mod:`~sb_crossmodal_kd.prep.steps`: the resumable steps (tokenizer, aligner, alignments,
  senone tree, unit stores, teacher caches);
- :mod:`~sb_crossmodal_kd.prep.unit_lms`: the unit LMs, trained in worker processes;
- :mod:`~sb_crossmodal_kd.prep.chain`: the two entry points that run the steps in order;
- :mod:`~sb_crossmodal_kd.prep.recipes`: the command line the recipes' prepare scripts share.

The KD recipe's training-time hook is :mod:`sb_crossmodal_kd.kd_data`;
:mod:`sb_crossmodal_kd.pipeline` re-exports the public names of both.
"""
