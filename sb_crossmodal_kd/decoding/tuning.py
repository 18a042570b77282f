"""The LM weight and beam width of LM decoding, chosen by WER on a validation set.

The acoustic model runs once; each setting of the grid only decodes its log-probabilities
again. Choose on the validation set and report the test set with the choice: tuning on
test would overstate what the LM gives.
"""

import itertools

from speechbrain.utils.edit_distance import accumulatable_wer_stats

__all__ = ["choose_decoding_settings", "word_error_rate"]

# Up to 4: on the study's models (40 subword pieces, a 3-gram of the same grammar) valid chose
# 2, the top of a grid that stopped there, for every model.
DEFAULT_LM_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 3.0, 4.0)
DEFAULT_BEAM_WIDTHS = (8, 32)


def word_error_rate(hypotheses, references):
    """WER in % of hypothesis texts against reference texts (words split on whitespace).

    Example
    -------
    >>> word_error_rate(["TURN ON THE LIGHT"], ["TURN OFF THE LIGHT"])
    25.0
    """
    stats = accumulatable_wer_stats([ref.split() for ref in references],
                                    [hyp.split() for hyp in hypotheses])
    return stats["WER"]


def choose_decoding_settings(searcher, log_probs, lengths, references,
                             lm_weights=DEFAULT_LM_WEIGHTS, beam_widths=DEFAULT_BEAM_WIDTHS,
                             word_insertion_bonuses=(0.0,)):
    """Decodes validation log-probabilities with every setting of a grid; returns the WERs
    and the setting with the lowest (ties: the narrower beam, then the lower LM weight,
    then the smaller bonus).

    Arguments
    ---------
    searcher : NgramCTCBeamSearcher
        The decoder (its settings are left at the choice).
    log_probs : torch.Tensor or list of torch.Tensor
        ``[B, T, V + 1]`` CTC log-probabilities of the validation utterances, or a list of
        such batches.
    lengths : torch.Tensor or list of torch.Tensor
        ``[B]`` relative lengths (one tensor per batch when ``log_probs`` is a list).
    references : list of str
        Reference transcripts, in the order of the utterances.
    lm_weights, beam_widths, word_insertion_bonuses : sequence of float / int
        The grid.

    Returns
    -------
    dict
        ``{"grid": [{"lm_weight", "beam_width", "word_insertion_bonus", "wer"}, ...],
        "best": the chosen row}``.

    Example
    -------
    >>> import pathlib, tempfile, torch
    >>> from sb_crossmodal_kd.decoding import NgramCTCBeamSearcher, train_ngram
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / "text.txt").write_text("A B\\n" * 10)
    >>> lm = train_ngram(folder / "text.txt", folder / "lm.arpa", order=2)
    >>> searcher = NgramCTCBeamSearcher(2, ["▁A", "▁B"], lm)
    >>> probs = torch.tensor([[[0.6, 0.3, 0.1], [0.02, 0.02, 0.96], [0.6, 0.3, 0.1]]])
    >>> result = choose_decoding_settings(searcher, probs.log(), torch.tensor([1.0]),
    ...                                   ["A B"], lm_weights=(0.0, 1.0), beam_widths=(4,))
    >>> [(row["lm_weight"], row["wer"]) for row in result["grid"]]
    [(0.0, 50.0), (1.0, 0.0)]
    >>> result["best"]["lm_weight"], searcher.settings["lm_weight"]
    (1.0, 1.0)
    """
    if not isinstance(log_probs, list | tuple):
        log_probs, lengths = [log_probs], [lengths]
    grid = []
    for beam_width, lm_weight, bonus in itertools.product(beam_widths, lm_weights,
                                                          word_insertion_bonuses):
        searcher.configure(lm_weight=lm_weight, beam_width=beam_width,
                           word_insertion_bonus=bonus)
        hypotheses = [text for batch, batch_lengths in zip(log_probs, lengths, strict=True)
                      for text in searcher.transcribe(batch, batch_lengths)]
        if len(hypotheses) != len(references):
            raise ValueError(f"{len(hypotheses)} utterances decoded but {len(references)} "
                             "references given.")
        grid.append({"lm_weight": float(lm_weight), "beam_width": int(beam_width),
                     "word_insertion_bonus": float(bonus),
                     "wer": word_error_rate(hypotheses, references)})
    best = min(grid, key=lambda row: (row["wer"], row["beam_width"], row["lm_weight"],
                                      row["word_insertion_bonus"]))
    searcher.configure(lm_weight=best["lm_weight"], beam_width=best["beam_width"],
                       word_insertion_bonus=best["word_insertion_bonus"])
    return {"grid": grid, "best": best}
