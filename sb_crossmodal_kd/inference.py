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

__all__ = ["CTCAcousticModel", "export_asr", "load_asr", "read_audio", "transcribe_files"]

EXPORT_FORMAT = "sb_crossmodal_kd.export/1"
RECORD_FILE = "export.json"
HPARAMS_FILE = "hyperparams.yaml"
MODEL_CARD = "README.md"
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
decoding_function: !name:speechbrain.decoders.ctc_greedy_decode
    blank_id: !ref <blank_index>
audio_normalizer: !new:speechbrain.dataio.preprocess.AudioNormalizer
    sample_rate: !ref <sample_rate>
modules:
    encoder: !ref <encoder>
pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        encoder: !ref <encoder>
        normalizer: !ref <normalizer>
        tokenizer: !ref <tokenizer>
"""


def _inference_yaml(tree, header):
    """The text of the exported ``hyperparams.yaml``."""
    yaml = ruamel.yaml.YAML()
    out = yaml.load(INFERENCE_TEMPLATE)
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


def export_asr(run, output_dir, overrides=None, min_key="WER", force=False):
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

    # The checkpointed objects the inference model consists of, under their checkpoint keys.
    recoverables = dict(tree["checkpointer"].get("recoverables") or {})
    checkpoint_keys = {}
    for role in INFERENCE_ROLES:
        node = tree["modules"][role]
        keys = [key for key, value in recoverables.items() if value is node]
        checkpoint_keys[role] = keys[0] if keys else None

    yaml_text = _inference_yaml(tree, f"Inference model exported by `sbkd export` from "
                                      f"{hparams_file}\nLoad: speechbrain.inference.ASR."
                                      "EncoderASR.from_hparams(source=<this folder>)")
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
    atomic_write_text(output_dir / HPARAMS_FILE, yaml_text)
    results_file = hparams_file.parent / "results.json"  # the run's test results, if tested
    test_results = json.loads(results_file.read_text()) if results_file.is_file() else None
    atomic_write_text(output_dir / MODEL_CARD, _model_card(
        tree, hparams_file, checkpoint.meta, test_results, count_parameters(kept)))
    written = sorted([*files, "tokenizer.ckpt", HPARAMS_FILE, MODEL_CARD])
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
    }
    atomic_write_json(output_dir / RECORD_FILE, record)
    return record


# What a model card reports of the training settings, where the hparams have them.
CARD_SETTINGS = ("condition", "seed", "data_folder", "train_csv", "prep_folder", "vocab_size",
                 "d_model", "num_layers", "nhead", "d_ffn", "use_moe", "number_of_epochs",
                 "lr", "max_batch_seconds", "sample_rate")


def _model_card(tree, hparams_file, meta, test_results, parameters):
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
        "",
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


# Inference -------------------------------------------------------------------------------


def load_asr(model_dir, device="cpu"):
    """Loads an exported model as SpeechBrain's ``EncoderASR``, reading its files in place
    (no ``savedir``, so no links and no copies)."""
    from speechbrain.inference.ASR import EncoderASR

    model_dir = Path(model_dir)
    record = _previous_export(model_dir) if model_dir.is_dir() else None
    if record is None or not record.get("complete"):
        # from_hparams would take a missing local folder for a HuggingFace model name.
        raise FileNotFoundError(
            f"{model_dir} is not a complete exported model (no {RECORD_FILE} of a finished "
            "export): make one with `sbkd export --run RUN_FOLDER --output DIR`."
        )
    return EncoderASR.from_hparams(source=str(model_dir.resolve()), run_opts={"device": device})


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
