"""Subword units: one small tokenizer interface over SentencePiece or a transformers tokenizer.

Interface used by the rest of the package (teachers, pipelines, the CTC output):

- ``tokenizer.encode(text) -> list[int]`` and ``tokenizer.decode(ids) -> str``;
- ``tokenizer.vocab_size`` (ids are ``0 .. vocab_size - 1``);
- ``tokenizer.hash``: a short stable digest of the tokenizer model, written into the headers of
  unit stores and teacher caches so that a mismatch is refused.

Two implementations:

- :class:`SentencePieceUnits` trains (or loads) SpeechBrain's
  :class:`speechbrain.tokenizers.SentencePiece.SentencePiece` on a corpus CSV column or a plain
  text file (one sentence per line), e.g. the embedded corpus's ``lm_text/train.txt``;
- :class:`PretrainedTokenizerUnits` wraps ``transformers.AutoTokenizer`` loaded from a local
  folder, so that a transformers teacher LM and the acoustic model share one vocabulary.

Example
-------
>>> folder = getfixture("tmp_path")
>>> text = folder / "text.txt"
>>> _ = text.write_text("turn on the kitchen lights\\nturn off the oven\\n" * 20)
>>> units = SentencePieceUnits(str(folder / "spm"), vocab_size=20, text_file=str(text))
>>> ids = units.encode("turn on the oven")
>>> units.decode(ids), 0 < max(ids) < units.vocab_size
('turn on the oven', True)
"""

import hashlib
import os


def _file_digest(paths):
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


class SentencePieceUnits:
    """A SentencePiece tokenizer trained with SpeechBrain's wrapper.

    If ``model_dir`` already holds a model of this ``vocab_size`` and ``model_type``, it is
    loaded, not retrained (SpeechBrain's behaviour).

    Arguments
    ---------
    model_dir : str
        Folder of the tokenizer model.
    vocab_size : int
        Number of pieces.
    csv_file : str, optional
        SpeechBrain CSV manifest to train on (column ``csv_column``).
    csv_column : str
        Transcript column of ``csv_file``.
    text_file : str, optional
        Plain text file to train on instead (one sentence per line).
    model_type : str
        ``"unigram"``, ``"bpe"`` or ``"char"``.
    """

    def __init__(
        self,
        model_dir,
        vocab_size,
        csv_file=None,
        csv_column="wrd",
        text_file=None,
        model_type="unigram",
    ):
        from speechbrain.tokenizers.SentencePiece import SentencePiece

        model_file = os.path.join(model_dir, f"{vocab_size}_{model_type}.model")
        found = os.path.isfile(model_file)
        if csv_file is None and text_file is None and not found:
            raise ValueError(
                f"SentencePieceUnits: no model in {model_dir!r} for vocab_size={vocab_size}, "
                f"model_type={model_type!r}; pass csv_file or text_file to train one"
            )
        for path in (csv_file, text_file):
            if path is not None and not os.path.isfile(path):
                raise FileNotFoundError(f"SentencePieceUnits: training file {path!r} not found")
        try:  # SpeechBrain's SentencePiece loads a model it finds, else trains one
            self.spm = SentencePiece(
                model_dir,
                vocab_size,
                annotation_train=csv_file,
                annotation_read=csv_column if csv_file else None,
                model_type=model_type,
                text_file=text_file,
            )
        except RuntimeError as error:
            if not found:
                raise
            raise ValueError(
                f"SentencePieceUnits: {model_file} is not a model SentencePiece can read "
                f"(truncated or damaged?): restore it, or delete it to train it again from "
                f"the training text"
            ) from error
        self.model_file = self.spm.prefix_model_file + ".model"
        self._hash = f"spm:{_file_digest([self.model_file])}"

    @property
    def vocab_size(self):
        """Number of ids."""
        return self.spm.sp.vocab_size()

    @property
    def hash(self):
        """Stable digest of the model file."""
        return self._hash

    def encode(self, text):
        """Text -> list of piece ids."""
        return self.spm.sp.encode_as_ids(text)

    def decode(self, ids):
        """Piece ids -> text."""
        return self.spm.sp.decode_ids([int(i) for i in ids])

    def pieces(self, text):
        """Text -> list of piece strings (for inspection)."""
        return self.spm.sp.encode_as_pieces(text)


class PretrainedTokenizerUnits:
    """A transformers tokenizer from a local folder as the subword unit.

    Special tokens (BOS/EOS) are not added by :meth:`encode`: units are the text's own pieces.

    Arguments
    ---------
    folder : str
        A folder written by ``tokenizer.save_pretrained`` (no network access is attempted).
    """

    def __init__(self, folder):
        from sb_crossmodal_kd.extras import require

        AutoTokenizer = require("transformers").AutoTokenizer

        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"PretrainedTokenizerUnits: {folder!r} is not a folder; save a tokenizer there "
                "with tokenizer.save_pretrained(folder)"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        files = [
            os.path.join(folder, f)
            for f in os.listdir(folder)
            if f.startswith(("tokenizer", "vocab", "merges", "special_tokens", "spm", "sentencepiece"))
        ]
        self._hash = f"hf:{_file_digest(files)}"

    @property
    def vocab_size(self):
        """Number of ids (including added tokens)."""
        return len(self.tokenizer)

    @property
    def hash(self):
        """Stable digest of the tokenizer files."""
        return self._hash

    def encode(self, text):
        """Text -> list of token ids, without special tokens."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids):
        """Token ids -> text."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True).strip()
