"""Word-boundary errors between two word alignments: how far a forced alignment's times are off.

Example
-------
>>> boundary_errors([("hi", 0.10, 0.42)], [("hi", 0.12, 0.40)])
[0.02, 0.02]
"""


def boundary_errors(reference_words, hypothesis_words, signed=False):
    """Word start and end differences (seconds) between two word alignments.

    ``hypothesis_words`` has one entry per transcript word. A reference entry may hold several
    words (a synthesiser that speaks "in the" as one unit reports one span for both): it is
    compared with the span from its first word's start to its last word's end.

    Arguments
    ---------
    reference_words, hypothesis_words : list of (word, start_s, end_s)
    signed : bool
        Return ``hypothesis - reference`` (negative: the hypothesis is early) instead of the
        absolute difference.

    Returns
    -------
    list of float
        Start and end error of each reference entry, in order.

    Example
    -------
    >>> ref = [("a", 0.1, 0.3), ("b c", 0.3, 0.5)]
    >>> hyp = [("a", 0.12, 0.3), ("b", 0.3, 0.4), ("c", 0.4, 0.45)]
    >>> boundary_errors(ref, hyp)
    [0.02, 0.0, 0.0, 0.05]
    >>> boundary_errors(ref, hyp, signed=True)
    [0.02, 0.0, 0.0, -0.05]
    """
    errors, i = [], 0
    for text, r0, r1 in reference_words:
        n = len(text.split())
        group = hypothesis_words[i : i + n]
        if [w[0] for w in group] != text.split():
            raise ValueError(
                f"boundary_errors: reference word(s) {text!r} do not match the aligned words "
                f"{[w[0] for w in group]}"
            )
        h0, h1 = group[0][1], group[-1][2]
        diffs = (h0 - r0, h1 - r1)
        errors += [round(d if signed else abs(d), 6) for d in diffs]
        i += n
    if i != len(hypothesis_words):
        raise ValueError("boundary_errors: the aligned words outnumber the reference words")
    return errors
