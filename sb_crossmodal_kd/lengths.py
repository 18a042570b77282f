"""Lengths of padded batches: SpeechBrain's relative lengths as counts and as masks.

SpeechBrain gives every padded tensor relative lengths ``[B]`` (1.0: the longest item of the
batch). Every module of the package turns them into counts with :func:`absolute_lengths` and
into masks with :func:`lengths_to_mask` (on SpeechBrain's own ``length_to_mask``), so that
padding means the same frames everywhere. Neither reads a value back to the host.

Example
-------
>>> lengths = torch.tensor([1.0, 0.5])
>>> absolute_lengths(lengths, 4)
tensor([4, 2])
>>> lengths_to_mask(lengths, 4)
tensor([[ True,  True,  True,  True],
        [ True,  True, False, False]])
"""

import torch
from speechbrain.dataio.dataio import length_to_mask

__all__ = ["absolute_lengths", "input_lengths", "lengths_to_mask"]


def absolute_lengths(lengths, max_len):
    """Integer lengths ``[B]`` from relative (floating, rounded as SpeechBrain rounds them) or
    absolute (integer) lengths, for a padded size of ``max_len``.

    Example
    -------
    >>> absolute_lengths(torch.tensor([1.0, 0.5]), 4), absolute_lengths(torch.tensor([4, 2]), 4)
    (tensor([4, 2]), tensor([4, 2]))
    """
    lengths = torch.as_tensor(lengths)
    if lengths.is_floating_point():
        return torch.round(lengths.float() * max_len).long()
    return lengths.long()


def lengths_to_mask(lengths, max_len):
    """Bool mask ``[B, max_len]``, True on real frames, from relative or absolute lengths.

    Example
    -------
    >>> lengths_to_mask(torch.tensor([3, 1]), 3)
    tensor([[ True,  True,  True],
            [ True, False, False]])
    """
    return length_to_mask(absolute_lengths(lengths, max_len), max_len=max_len, dtype=torch.bool)


def input_lengths(batch):
    """``[B]`` relative lengths of a batch's input: its cached ``feats`` when it has them,
    else its waveforms ``sig``.

    Example
    -------
    >>> from types import SimpleNamespace
    >>> from speechbrain.dataio.batch import PaddedData
    >>> input_lengths(SimpleNamespace(sig=PaddedData(torch.zeros(2, 4), torch.tensor([1.0, 0.5]))))
    tensor([1.0000, 0.5000])
    """
    return batch.feats.lengths if hasattr(batch, "feats") else batch.sig.lengths
