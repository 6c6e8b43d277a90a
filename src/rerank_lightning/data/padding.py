"""Padding id lists into batches: training collation and inference share it (no datasets, no Lightning)."""

from __future__ import annotations

import array
import itertools
import math
from typing import Sequence

import numpy as np
import torch


def real_token_mask(lengths: np.ndarray, length: int, side: str) -> np.ndarray:
    """[N, length] bool: where each row's real tokens sit once padded to `length` on `side`."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    columns = np.arange(length)
    return columns >= (length - lengths)[:, None] if side == "left" else columns < lengths[:, None]


def pad_batch(sequences: Sequence[Sequence[int]], pad_value: int, side: str = "left",
              multiple: int | None = 8) -> torch.Tensor:
    """Stack lists of ids into [N, L], L the longest rounded up to `multiple`.

    One pass over all ids into a flat array, then a single masked write (a Python loop per row
    would cost more than building the items).
    """
    lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
    length = int(lengths.max())
    if multiple:
        length = math.ceil(length / multiple) * multiple
    real = real_token_mask(lengths, length, side)
    out = np.full((len(sequences), length), pad_value, dtype=np.int64)
    out[real] = _flat_ids(sequences)  # the masked write fills row by row, each sequence in order
    return torch.from_numpy(out)


def _flat_ids(sequences: Sequence[Sequence[int]]) -> np.ndarray:
    """All ids, row after row, as one int64 array (`array.fromlist` is the fastest path for lists)."""
    if all(type(seq) is list for seq in sequences):
        flat = array.array("q")
        for seq in sequences:
            flat.fromlist(seq)
        return np.frombuffer(flat, dtype=np.int64)
    return np.fromiter(itertools.chain.from_iterable(sequences), dtype=np.int64)
