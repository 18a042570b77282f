"""Exports a trained CTC model for inference and transcribes audio with it.

:func:`export_asr` turns a finished training run of the CTC recipes (``CTCBrain`` or
``KDBrain``, dense or MoE) into a folder that SpeechBrain's ``EncoderASR`` loads::

    from speechbrain.inference.ASR import EncoderASR
    asr = EncoderASR.from_hparams(source="exported_model")
    asr.transcribe_file("utterance.wav")

The folder holds ``hyperparams.yaml`` (features, normalizer, encoder, output layer, the
SentencePiece tokenizer and greedy CTC decoding), ``encoder.ckpt`` (the weights),
``normalizer.ckpt`` (the feature statistics), ``tokenizer.ckpt`` (the SentencePiece model),
``README.md`` (a model card: training data and settings, valid and test WER, how to load it)
and ``export.json`` (where it came from). Everything the training run had only for training
(auxiliary heads, teachers, optimiser, data) is left out.

Exported with a word n-gram LM (``export_asr(..., lm=ARPA)``, ``sbkd export --lm``), the
folder also holds ``lm.ckpt`` (the LM, in the ARPA format) and its hparams decode with CTC
beam search and the LM (:class:`sb_crossmodal_kd.decoding.NgramCTCBeamSearcher`, which
``EncoderASR`` builds from ``decoding_function`` and ``test_beam_search``, the settings).
:func:`load_asr` and :func:`set_decoding` switch any exported model to LM decoding with an
ARPA file, to other settings, or back to greedy decoding.

Local folders and ``savedir``: given no ``savedir``, ``from_hparams`` reads the files where
they are. Given one, SpeechBrain puts symbolic links to the folder's files there and, on a
later load, reuses whatever that ``savedir`` already holds: use a separate ``savedir`` per
model (:func:`load_asr` passes none).
"""

import contextlib
import io
import json
import shutil
from pathlib import Path

import ruamel.yaml
import torch
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from sb_crossmodal_kd.brain import encode_waveforms
from sb_crossmodal_kd.experiment import WRAPPER_KEY, file_overrides
from sb_crossmodal_kd.io import atomic_path, atomic_write_json, atomic_write_text
from sb_crossmodal_kd.nnet.moe import padding_mask

__all__ = ["CTCAcousticModel", "export_asr", "load_asr", "read_audio", "set_decoding",
           "transcribe_files"]

EXPORT_FORMAT = "sb_crossmodal_kd.export/1"
RECORD_FILE = "export.json"
HPARAMS_FILE = "hyperparams.yaml"
MODEL_CARD = "README.md"
LM_FILE = "lm.ckpt"  # the name SpeechBrain's Pretrainer gives the loadable "lm"
SENTENCEPIECE = "speechbrain.tokenizers.SentencePiece.SentencePiece"

# The modules CTCBrain.compute_forward runs, in order; every other training module
# (auxiliary heads, ...) is used only in training.
INFERENCE_ROLES = ("compute_features", "normalize", "encoder", "ctc_lin")


class CTCAcousticModel(torch.nn.Module):
    """Waveforms to frame log-probabilities over the CTC outputs.

    The ``encoder`` module of an exported ``EncoderASR`` model: the steps of
    :meth:`sb_crossmodal_kd.brain.CTCBrain.compute_forward` (features, normalisation,
    encoder, output layer, log-softmax) behind one call.

    Arguments
    ---------
    compute_features : torch.nn.Module
        Waveforms ``[B, S]`` to features ``[B, T, F]`` (e.g. SpeechBrain's ``Fbank``).
    normalize : torch.nn.Module
        ``normalize(features, lengths)``, e.g. SpeechBrain's ``InputNormalization``.
    encoder : torch.nn.Module
        ``encoder(features, lengths) -> [B, T', D]``.
    ctc_lin : torch.nn.Module
        Output layer to the CTC classes (subwords + blank).
    log_softmax : torch.nn.Module
        Log-softmax over the last dimension.

    Example
    -------
    >>> from speechbrain.lobes.features import Fbank
    >>> from speechbrain.nnet.activations import Softmax
    >>> from speechbrain.processing.features import InputNormalization
    >>> from sb_crossmodal_kd.nnet.conformer import ConformerCTCEncoder
    >>> model = CTCAcousticModel(
    ...     Fbank(n_mels=20), InputNormalization(norm_type="sentence"),
    ...     ConformerCTCEncoder(n_mels=20, d_model=16, num_layers=1, nhead=2, d_ffn=32),
    ...     torch.nn.Linear(16, 11), Softmax(apply_log=True),
    ... ).eval()
    >>> log_probs = model(torch.randn(2, 16000), torch.tensor([1.0, 0.5]))
    >>> log_probs.shape
    torch.Size([2, 26, 11])
    >>> torch.allclose(log_probs.exp().sum(-1), torch.ones(2, 26))
    True
    """

    def __init__(self, compute_features, normalize, encoder, ctc_lin, log_softmax):
        super().__init__()
        self.compute_features = compute_features
        self.normalize = normalize
        self.encoder = encoder
        self.ctc_lin = ctc_lin
        self.log_softmax = log_softmax

    def forward(self, wavs, wav_lens=None):
        """``wavs`` [B, S] with relative lengths ``wav_lens`` [B] -> log-probs [B, T', C]."""
        if wav_lens is None:
            wav_lens = torch.ones(wavs.shape[0], device=wavs.device)
        # As in training (MoEMixin): MoE layers that their encoder does not give the padding
        # mask itself take it from the batch's relative lengths.
        with padding_mask(self.encoder, lengths=wav_lens):
            encoded = encode_waveforms(wavs, wav_lens, self.encoder, self.compute_features,
                                       self.normalize)
        return self.log_softmax(self.ctc_lin(encoded))


# Training run -> resolved hparams tree ---------------------------------------------------


def _training_tree(run, overrides=None):
    """The run's hparams as a ruamel tree with references and includes resolved.

    ``run`` is a training output folder (its ``hyperparams.yaml``, as SpeechBrain saved it)
    or a recipe hparams file (with ``overrides``, as given to the recipe).
    """
    from hyperpyyaml import resolve_references

    run = Path(run)
    hparams_file = run / HPARAMS_FILE if run.is_dir() else run
    if not hparams_file.is_file():
        raise FileNotFoundError(
            f"{hparams_file} not found: pass the output folder of a training run (it holds "
            "the hyperparams.yaml SpeechBrain writes) or a recipe hparams file with its "
            "overrides."
        )
    with open(hparams_file, encoding="utf-8") as handle:
        resolved = resolve_references(handle, file_overrides(hparams_file, overrides))
    tree = ruamel.yaml.YAML().load(resolved)
    if list(tree) == [WRAPPER_KEY]:
        tree = tree[WRAPPER_KEY]
    missing = [key for key in ("modules", "checkpointer", "tokenizer", "log_softmax",
                               "blank_index", "sample_rate") if key not in tree]
    missing += [f"modules.{role}" for role in INFERENCE_ROLES
                if "modules" in tree and role not in tree["modules"]]
    if missing:
        raise ValueError(
            f"{hparams_file} lacks {', '.join(missing)}: export takes runs of the CTC recipes "
            "(CTCBrain / KDBrain hparams, see recipes/SynthCommands/ASR and KD)."
        )
    return hparams_file, tree


def _tag(node):
    tag = getattr(node, "tag", None)
    return (getattr(tag, "value", None) or "") if tag is not None else ""


def _without_comments(node, memo):
    """A copy of a ruamel node without its comments (the training file's remarks about
    training), keeping tags and shared nodes shared."""
    if id(node) in memo:
        return memo[id(node)]
    if isinstance(node, CommentedMap):
        copy = CommentedMap()
        memo[id(node)] = copy
        for key, value in node.items():
            copy[key] = _without_comments(value, memo)
    elif isinstance(node, CommentedSeq):
        copy = CommentedSeq()
        memo[id(node)] = copy
        copy.extend(_without_comments(value, memo) for value in node)
    else:
        return node
    if _tag(node):
        copy.yaml_set_ctag(node.tag)
    return copy


def _checkpoints_dir(tree, run):
    """The run's checkpoint folder; follows a run folder that was moved since training."""
    recorded = Path(str(tree["checkpointer"]["checkpoints_dir"]))
    run = Path(run)
    if recorded.is_dir() or not run.is_dir() or "output_folder" not in tree:
        return recorded
    with contextlib.suppress(ValueError):
        return run / recorded.relative_to(str(tree["output_folder"]))
    return recorded


def _best_checkpoint(checkpoints_dir, recoverables, min_key):
    from speechbrain.utils.checkpoints import Checkpointer

    if not Path(checkpoints_dir).is_dir():
        raise FileNotFoundError(
            f"No checkpoint folder {checkpoints_dir}: the run has not saved a checkpoint yet "
            "(the recipes save one after each validation); train it first."
        )
    checkpointer = Checkpointer(checkpoints_dir, recoverables=recoverables)
    checkpoint = checkpointer.find_checkpoint(min_key=min_key)
    if checkpoint is None:
        raise FileNotFoundError(
            f"No checkpoint with a '{min_key}' value in {checkpoints_dir}: the run has not "
            "finished a validation pass (each one saves a checkpoint); train it first."
        )
    return checkpointer, checkpoint


def _tokenizer_model(tree):
    """Path of the run's SentencePiece model (where SpeechBrain's wrapper keeps it)."""
    node = tree["tokenizer"]
    if not _tag(node).endswith(SENTENCEPIECE):
        raise ValueError(
            f"tokenizer is {_tag(node) or node!r}; export supports SpeechBrain's SentencePiece "
            f"tokenizer ({SENTENCEPIECE})."
        )
    # SpeechBrain's SentencePiece names its model <model_dir>/<vocab_size>_<model_type>.model
    model = Path(str(node["model_dir"])) / f"{node['vocab_size']}_{node.get('model_type', 'unigram')}.model"
    if not model.is_file():
        raise FileNotFoundError(
            f"Tokenizer model {model} not found: it is made when training starts; the run's "
            "tokenizer folder must still exist to export the model."
        )
    return model


# The exported hparams: SpeechBrain's usual inference layout; the values that are null here
# are the run's own (its resolved nodes, filled in by _inference_yaml).
INFERENCE_TEMPLATE = """\
sample_rate: null
blank_index: null
compute_features: null
normalizer: null
acoustic_encoder: null
ctc_lin: null
log_softmax: null
encoder: !new:sb_crossmodal_kd.inference.CTCAcousticModel
    compute_features: !ref <compute_features>
    normalize: !ref <normalizer>
    encoder: !ref <acoustic_encoder>
    ctc_lin: !ref <ctc_lin>
    log_softmax: !ref <log_softmax>
tokenizer: !new:sentencepiece.SentencePieceProcessor
{decoding}audio_normalizer: !new:speechbrain.dataio.preprocess.AudioNormalizer
    sample_rate: !ref <sample_rate>
modules:
    encoder: !ref <encoder>
pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        encoder: !ref <encoder>
        normalizer: !ref <normalizer>
        tokenizer: !ref <tokenizer>
{lm_loadable}"""
GREEDY_DECODING = """\
decoding_function: !name:speechbrain.decoders.ctc_greedy_decode
    blank_id: !ref <blank_index>
"""
# The LM is filled from lm.ckpt by the pretrainer (after the tokenizer); EncoderASR then
# builds the searcher with test_beam_search and the tokenizer's pieces as vocab_list.
LM_DECODING = """\
language_model: !new:sb_crossmodal_kd.decoding.ngram.NgramLM
decoding_function: !name:sb_crossmodal_kd.decoding.beam_search.NgramCTCBeamSearcher
test_beam_search:
    blank_index: !ref <blank_index>
    language_model: !ref <language_model>
"""
LM_LOADABLE = "        lm: !ref <language_model>\n"


def _inference_yaml(tree, header, lm_settings=None):
    """The text of the exported ``hyperparams.yaml``; LM decoding with ``lm_settings``
    (``lm_weight``, ``word_insertion_bonus``, ``beam_width``) when given."""
    yaml = ruamel.yaml.YAML()
    out = yaml.load(INFERENCE_TEMPLATE.format(
        decoding=GREEDY_DECODING if lm_settings is None else LM_DECODING,
        lm_loadable="" if lm_settings is None else LM_LOADABLE))
    for key, value in (lm_settings or {}).items():
        out["test_beam_search"][key] = value
    memo = {}
    for key, source in (("compute_features", tree["modules"]["compute_features"]),
                        ("normalizer", tree["modules"]["normalize"]),
                        ("acoustic_encoder", tree["modules"]["encoder"]),
                        ("ctc_lin", tree["modules"]["ctc_lin"]),
                        ("log_softmax", tree["log_softmax"]),
                        ("sample_rate", tree["sample_rate"]),
                        ("blank_index", tree["blank_index"])):
        out[key] = _without_comments(source, memo)
    out.yaml_set_start_comment(header)
    stream = io.StringIO()
    yaml.dump(out, stream)
    return stream.getvalue()


# Output folder ---------------------------------------------------------------------------


def _previous_export(folder):
    """The record of an earlier export in ``folder``, or None."""
    record = folder / RECORD_FILE
    if not record.is_file():
        return None
    with contextlib.suppress(ValueError, OSError):
        data = json.loads(record.read_text())
        if isinstance(data, dict) and data.get("format") == EXPORT_FORMAT:
            return data
    return None


def _claim_output(folder, force):
    """Checks that writing the export into ``folder`` loses nothing of the user's; returns
    the files of an earlier export there (to remove those the new one does not rewrite)."""
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a folder.")
    if not folder.is_dir() or not any(folder.iterdir()):
        return []
    previous = _previous_export(folder)
    if previous is not None:
        return list(previous.get("files", []))
    if not force:
        raise FileExistsError(
            f"{folder} is not empty and holds no earlier export ({RECORD_FILE}): refusing to "
            "write the model there. Choose an empty or new folder, or pass --force "
            "(force=True) to write into it anyway (files of the same names are replaced, "
            "others are kept)."
        )
    return []


def export_asr(run, output_dir, overrides=None, min_key="WER", force=False, lm=None,
               lm_settings=None):
    """Writes the inference model of a training run to ``output_dir``.

    The model is the run's best checkpoint (lowest ``min_key``, as the recipes test with)
    without what only training used (auxiliary heads, ...); ``output_dir`` then loads with
    ``EncoderASR.from_hparams(source=output_dir)`` (see the module docstring).

    Arguments
    ---------
    run : str or Path
        A training output folder (with SpeechBrain's ``hyperparams.yaml`` and ``save/``),
        or the recipe hparams file the run was trained with.
    output_dir : str or Path
        Folder to write. A non-empty folder is refused unless it holds an earlier export
        (which is replaced) or ``force`` is set.
    overrides : dict or str, optional
        The run's overrides, when ``run`` is a recipe hparams file.
    min_key : str
        Checkpoint meta key to minimise when choosing the checkpoint.
    force : bool
        Write into a non-empty folder that is not an earlier export (files of the same
        names are replaced, others kept).
    lm : str or Path, optional
        A word n-gram LM (ARPA file, e.g. from :func:`sb_crossmodal_kd.decoding.train_ngram`)
        for the model to decode with; checked against the tokenizer before anything is
        written.
    lm_settings : dict, optional
        ``lm_weight``, ``word_insertion_bonus``, ``beam_width`` of LM decoding (defaults:
        :data:`sb_crossmodal_kd.decoding.beam_search.DEFAULT_SETTINGS`; choose them on
        valid with :func:`sb_crossmodal_kd.decoding.choose_decoding_settings`).

    Returns
    -------
    dict
        The export record also written to ``output_dir/export.json``.

    Example (a full training run and export) in ``tests/test_inference.py``.
    """
    from hyperpyyaml import load_hyperpyyaml
    from speechbrain.utils.checkpoints import DEFAULT_SAVE_HOOKS, get_default_hook

    from sb_crossmodal_kd.brain import count_parameters
    from sb_crossmodal_kd.nnet.heads import inference_modules

    output_dir = Path(output_dir).resolve()
    previous_files = _claim_output(output_dir, force)
    hparams_file, tree = _training_tree(run, overrides)
    lm_settings_given = any(value is not None for value in (lm_settings or {}).values())
    lm_settings = None if lm is None else _lm_decoding_settings(lm_settings)
    if lm is None and lm_settings_given:
        raise ValueError("LM decoding settings were given without an LM (lm=ARPA, --lm).")

    # The checkpointed objects the inference model consists of, under their checkpoint keys.
    recoverables = dict(tree["checkpointer"].get("recoverables") or {})
    checkpoint_keys = {}
    for role in INFERENCE_ROLES:
        node = tree["modules"][role]
        keys = [key for key, value in recoverables.items() if value is node]
        checkpoint_keys[role] = keys[0] if keys else None

    yaml_text = _inference_yaml(tree, f"Inference model exported by `sbkd export` from "
                                      f"{hparams_file}\nLoad: speechbrain.inference.ASR."
                                      "EncoderASR.from_hparams(source=<this folder>)",
                                lm_settings)
    hparams = load_hyperpyyaml(yaml_text)
    model = hparams["encoder"]
    objects = {"compute_features": model.compute_features, "normalize": model.normalize,
               "encoder": model.encoder, "ctc_lin": model.ctc_lin}
    for role, key in checkpoint_keys.items():
        if key is None and any(p.requires_grad for p in objects[role].parameters()):
            raise ValueError(
                f"modules.{role} of {hparams_file} is not among the checkpointer's "
                "recoverables, so its trained weights were never saved: add it to "
                "checkpointer.recoverables and retrain."
            )
    checkpointer, checkpoint = _best_checkpoint(
        _checkpoints_dir(tree, run),
        {key: objects[role] for role, key in checkpoint_keys.items() if key is not None},
        min_key,
    )
    try:
        checkpointer.load_checkpoint(checkpoint)
    except RuntimeError as error:  # torch's state_dict mismatch report
        raise RuntimeError(
            f"The checkpoint {checkpoint.path} does not fit the model that {hparams_file} "
            "builds with this version of sb_crossmodal_kd (trained with another version, or "
            f"the hparams were edited after training): {error}"
        ) from error
    kept = inference_modules(hparams["modules"])  # raises if heads hide inside the encoder
    tokenizer_model = _tokenizer_model(tree)
    language_model = None if lm is None else _checked_lm(lm, lm_settings, tokenizer_model,
                                                         int(tree["blank_index"]))

    output_dir.mkdir(parents=True, exist_ok=True)
    # Claimed first: an interrupted export is still recognised (and replaced) next time.
    record = {"format": EXPORT_FORMAT, "complete": False, "files": previous_files}
    atomic_write_json(output_dir / RECORD_FILE, record)
    files = {"encoder.ckpt": model, "normalizer.ckpt": model.normalize}
    for name, obj in files.items():
        with atomic_path(output_dir / name) as tmp:
            get_default_hook(obj, DEFAULT_SAVE_HOOKS)(obj, tmp)
    with atomic_path(output_dir / "tokenizer.ckpt") as tmp:
        shutil.copyfile(tokenizer_model, tmp)
    written_lm = []
    if language_model is not None:
        language_model.write_arpa(output_dir / LM_FILE)
        written_lm = [LM_FILE]
    atomic_write_text(output_dir / HPARAMS_FILE, yaml_text)
    results_file = hparams_file.parent / "results.json"  # the run's test results, if tested
    test_results = json.loads(results_file.read_text()) if results_file.is_file() else None
    lm_record = None if lm is None else {
        "source": str(Path(lm).resolve()), "order": language_model.order,
        "words": len(language_model.words), **lm_settings}
    atomic_write_text(output_dir / MODEL_CARD, _model_card(
        tree, hparams_file, checkpoint.meta, test_results, count_parameters(kept), lm_record))
    written = sorted([*files, "tokenizer.ckpt", HPARAMS_FILE, MODEL_CARD, *written_lm])
    for name in previous_files:  # an earlier export's files this one no longer has
        stale = output_dir / Path(name).name
        if name not in written and stale.is_file():
            stale.unlink()
    record = {
        "format": EXPORT_FORMAT,
        "complete": True,
        "run": str(hparams_file),
        "checkpoint": str(checkpoint.path),
        "checkpoint_meta": {k: v for k, v in checkpoint.meta.items()
                            if isinstance(v, int | float | str | bool)},
        "dropped_modules": sorted(set(tree["modules"]) - set(INFERENCE_ROLES)),
        "parameters": count_parameters(kept),
        "sample_rate": int(tree["sample_rate"]),
        "files": written,
        "lm": lm_record,
    }
    atomic_write_json(output_dir / RECORD_FILE, record)
    return record


def _lm_decoding_settings(settings):
    """The LM decoding settings: those given (None: unset), the defaults for the others."""
    from sb_crossmodal_kd.decoding.beam_search import DEFAULT_SETTINGS

    given = {key: value for key, value in (settings or {}).items() if value is not None}
    unknown = sorted(set(given) - set(DEFAULT_SETTINGS))
    if unknown:
        raise ValueError(f"Unknown LM decoding settings {unknown}: the settings are "
                         f"{sorted(DEFAULT_SETTINGS)}.")
    return {**DEFAULT_SETTINGS, **given}


def _checked_lm(lm, settings, tokenizer_model, blank_index):
    """The LM read from ``lm``, once a decoder with it, ``settings`` and the tokenizer's
    pieces was built (which refuses an LM the pieces cannot spell)."""
    import sentencepiece

    from sb_crossmodal_kd.decoding import NgramCTCBeamSearcher, load_ngram

    language_model = load_ngram(lm)
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model))
    pieces = [tokenizer.id_to_piece(i) for i in range(tokenizer.get_piece_size())]
    NgramCTCBeamSearcher(blank_index, pieces, language_model, **settings)
    return language_model


# What a model card reports of the training settings, where the hparams have them.
CARD_SETTINGS = ("condition", "seed", "data_folder", "train_csv", "prep_folder", "vocab_size",
                 "d_model", "num_layers", "nhead", "d_ffn", "use_moe", "number_of_epochs",
                 "lr", "max_batch_seconds", "sample_rate")


def _model_card(tree, hparams_file, meta, test_results, parameters, lm_record=None):
    """The exported folder's README.md: training data and settings, WERs, how to load it."""
    settings = [f"- `{key}`: {tree[key]}" for key in CARD_SETTINGS
                if key in tree and isinstance(tree[key], int | float | str | bool)]
    scores = []
    if isinstance(meta.get("WER"), int | float):
        scores.append(f"- valid WER of this checkpoint (the run's best): {meta['WER']:.2f} %")
    if test_results:
        scores.append(f"- test WER {test_results['wer']:.2f} %, CER {test_results['cer']:.2f} % "
                      f"on {test_results.get('utterances', '?')} utterances, greedy CTC "
                      "decoding (the run's own test)")
    lines = [
        "# CTC speech recogniser (sb-crossmodal-kd)", "",
        f"Exported by `sbkd export` from the training run `{hparams_file.parent}`: the "
        f"encoder and CTC output ({parameters:,} parameters) without what only training "
        "used (auxiliary heads, teachers).", "",
        "## Training", "", f"Hparams: `{hparams_file}`.", "", *settings, "",
        "## Results", "", *(scores or ["- not tested (no results.json beside the run's hparams)"]),
        "", *_lm_card_section(lm_record),
        "## Use", "",
        "```python",
        "from speechbrain.inference.ASR import EncoderASR",
        "",
        'asr = EncoderASR.from_hparams(source="<this folder>")',
        'print(asr.transcribe_file("speech.wav"))',
        "```", "",
        "or `sbkd transcribe --model <this folder> speech.wav`. Audio at another sample rate "
        f"is resampled to {tree['sample_rate']} Hz.", "",
    ]
    return "\n".join(lines)


def _lm_card_section(lm_record):
    """The model card's lines on LM decoding (none for a greedy model)."""
    if lm_record is None:
        return []
    return [
        "## Decoding", "",
        f"CTC beam search (beam {lm_record['beam_width']}) with a {lm_record['order']}-gram "
        f"word LM of {lm_record['words']:,} words (`{LM_FILE}`, ARPA format, from "
        f"`{lm_record['source']}`), LM weight {lm_record['lm_weight']}, word insertion bonus "
        f"{lm_record['word_insertion_bonus']}. The test WER above is the run's greedy "
        "decoding. `sbkd transcribe --greedy` decodes without the LM.", "",
    ]


# Inference -------------------------------------------------------------------------------


def load_asr(model_dir, device="cpu", lm=None, greedy=False, **lm_settings):
    """Loads an exported model as SpeechBrain's ``EncoderASR``, reading its files in place
    (no ``savedir``, so no links and no copies).

    It decodes as exported (greedy, or with the LM it was exported with); ``lm``,
    ``greedy`` and the settings (``lm_weight``, ``word_insertion_bonus``, ``beam_width``)
    change that as :func:`set_decoding` does. An LM that does not fit the model's tokenizer
    is refused here, before any decoding.
    """
    from speechbrain.inference.ASR import EncoderASR

    model_dir = Path(model_dir)
    record = _previous_export(model_dir) if model_dir.is_dir() else None
    if record is None or not record.get("complete"):
        # from_hparams would take a missing local folder for a HuggingFace model name.
        raise FileNotFoundError(
            f"{model_dir} is not a complete exported model (no {RECORD_FILE} of a finished "
            "export): make one with `sbkd export --run RUN_FOLDER --output DIR`."
        )
    asr = EncoderASR.from_hparams(source=str(model_dir.resolve()), run_opts={"device": device})
    if lm is not None or greedy or any(value is not None for value in lm_settings.values()):
        set_decoding(asr, lm=lm, greedy=greedy, **lm_settings)
    return asr


def set_decoding(asr, lm=None, greedy=False, lm_weight=None, word_insertion_bonus=None,
                 beam_width=None):
    """Sets how a loaded exported model (``EncoderASR``) decodes.

    Arguments
    ---------
    asr : speechbrain.inference.ASR.EncoderASR
        A model of :func:`load_asr` (or ``EncoderASR.from_hparams`` on an exported folder).
    lm : str or Path or NgramLM, optional
        Decode with this word n-gram LM (an ARPA file); without it, the model's own LM.
    greedy : bool
        Greedy CTC decoding (no LM) instead.
    lm_weight, word_insertion_bonus, beam_width : float, float, int, optional
        LM decoding settings to change (the others stay as exported, or the defaults).

    Raises
    ------
    ValueError
        Settings for a model with no LM and none given, or an LM that does not fit the
        model's tokenizer (:class:`sb_crossmodal_kd.decoding.VocabularyMismatchError`) or
        is malformed (:class:`sb_crossmodal_kd.decoding.ARPAFormatError`).
    OSError
        An LM file that is missing or cannot be read (named in the message).
    """
    import functools

    from speechbrain.decoders import ctc_greedy_decode

    from sb_crossmodal_kd.decoding import NgramCTCBeamSearcher, NgramLM, load_ngram

    settings = {key: value for key, value in (("lm_weight", lm_weight),
                                              ("word_insertion_bonus", word_insertion_bonus),
                                              ("beam_width", beam_width)) if value is not None}
    blank_index = int(asr.hparams.blank_index)
    if greedy:
        if lm is not None or settings:
            raise ValueError("Greedy decoding takes no LM and no LM decoding settings.")
        asr.hparams.decoding_function = functools.partial(ctc_greedy_decode,
                                                          blank_id=blank_index)
    else:
        exported = dict(getattr(asr.hparams, "test_beam_search", None) or {})
        if lm is None and "language_model" not in exported:
            raise ValueError("The model was exported without an LM: pass one (lm=ARPA, --lm) "
                             "to decode with LM settings.")
        if lm is not None:
            exported["language_model"] = lm if isinstance(lm, NgramLM) else load_ngram(lm)
        asr.hparams.decoding_function = NgramCTCBeamSearcher
        asr.hparams.test_beam_search = {"blank_index": blank_index, **exported, **settings}
    # A searcher is a torch Module, registered as the model's child: it must go before
    # anything else can take its attribute.
    if hasattr(asr, "decoding_function"):
        del asr.decoding_function
    asr.set_decoding_function()  # SpeechBrain's: builds the searcher with the pieces


def read_audio(asr, path):
    """Reads ``path`` as the model's input: mono, resampled to its sample rate.

    Raises ``ValueError`` naming the file when it cannot be read as audio.
    """
    from speechbrain.dataio import audio_io

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such audio file.")
    try:
        signal, sample_rate = audio_io.load(str(path), channels_first=False)
    except Exception as error:  # soundfile raises several types for unreadable files
        raise ValueError(
            f"{path}: cannot read it as audio ({error}); pass a WAV, FLAC or OGG file."
        ) from error
    if signal.shape[0] == 0:
        raise ValueError(f"{path}: the audio file holds no samples.")
    return asr.audio_normalizer(signal, sample_rate)


def transcribe_files(asr, paths):
    """Yields ``(path, transcript)`` for each file, or ``(path, ValueError)`` for a file that
    cannot be read (the others are still transcribed)."""
    for path in paths:
        try:
            waveform = read_audio(asr, path)
        except ValueError as error:
            yield path, error
            continue
        words, _ = asr.transcribe_batch(waveform.unsqueeze(0), torch.tensor([1.0]))
        yield path, words[0]
