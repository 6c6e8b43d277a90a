"""Padding-free groups (`data.packing`): the pairs of a batch packed into as few rows as fit a token budget.

The pairs of one group share their first tokens (`[BOS] A: query \\n B:` before the passage). With
`groups`, each row holds chunks: one copy of a group's shared prefix followed by the rest of each of its
pairs placed in that row. Position ids keep each token's position in its own pair (a chunk starts at
0; a pair's rest continues after the prefix), so every score equals the padded path's; `pair_ids` says
which pair a token belongs to (-1: a shared prefix, or a row's trailing padding), from which
`model.scoring.packed_attention_mask` lets each pair see its prefix and itself only. Without `groups`
(or when no group shares a token) every pair is a chunk of its own and `pair_ids` is left out: the
restarting position ids alone tell transformers the sequences apart.
"""

from __future__ import annotations

import itertools
import math
from typing import Mapping, Sequence

import numpy as np
import torch

IGNORE_INDEX = -100
PACKED_LENGTH = 1024  # tokens per packed row by default (data.packed_length)


def score_token_index(length: int, labels: Sequence[int] | None, ignore: int = IGNORE_INDEX) -> int:
    """Where a pair's score is read: before its single labelled token, else at its last token (SPEC 3)."""
    if labels is None:
        return length - 1
    if labels[-1] != ignore:
        return length - 2
    return int(np.flatnonzero(np.asarray(labels) != ignore)[0]) - 1


def shared_prefix_length(sequences: Sequence[Sequence[int]], score_at: Sequence[int]) -> int:
    """Tokens the sequences of a group of two or more all begin with, stopping short of the first score
    token (every pair keeps its own score token and answer); 0 for a group of one."""
    if len(sequences) < 2:
        return 0
    limit = min(score_at)
    first = sequences[0]
    n = 0
    while n < limit and all(seq[n] == first[n] for seq in sequences[1:]):
        n += 1
    return n


def pack_rows(lengths: Sequence[int], budget: int, groups: Sequence[int] | None = None,
              prefix: Mapping[int, int] | None = None) -> list[list[int]]:
    """First fit: the pair indices of each row, a row's tokens summing to at most `budget` (a pair longer
    than the budget gets a row of its own). With `groups`, pair i costs its length less its group's
    `prefix` in a row that already holds that group's prefix, and such rows are tried first.

    Two orders are tried: the longest pair first, and group by group (the group with the most tokens
    first, each group's longest pair first), which keeps a group's pairs in the rows that hold its prefix
    when several groups share a batch. The packing with fewer rows, then the narrower widest row, is kept.
    """
    groups = groups if groups is not None else range(len(lengths))
    prefix = prefix if prefix is not None else {}
    total: dict[int, int] = {}
    for i, g in enumerate(groups):
        total[g] = total.get(g, 0) + lengths[i]
    pairs = range(len(lengths))
    orders = (sorted(pairs, key=lambda i: -lengths[i]),
              sorted(pairs, key=lambda i: (-total[groups[i]], groups[i], -lengths[i])))
    packings = [_first_fit(order, lengths, budget, groups, prefix) for order in orders]
    return min(packings, key=lambda packing: (len(packing[0]), max(packing[1], default=0)))[0]


def _first_fit(order: Sequence[int], lengths: Sequence[int], budget: int, groups: Sequence[int],
               prefix: Mapping[int, int]) -> tuple[list[list[int]], list[int]]:
    """`pack_rows` for one order of the pairs: the rows and the tokens each holds."""
    rows: list[list[int]] = []
    used: list[int] = []
    held: list[set[int]] = []  # the groups whose prefix each row holds
    for i in order:
        g = groups[i]
        for r in sorted(range(len(rows)), key=lambda r: g not in held[r]):  # rows holding g's prefix first
            cost = lengths[i] - (prefix.get(g, 0) if g in held[r] else 0)
            if used[r] + cost <= budget:
                rows[r].append(i)
                used[r] += cost
                held[r].add(g)
                break
        else:
            rows.append([i])
            used.append(lengths[i])
            held.append({g})
    return rows, used


def balanced_rows(lengths: Sequence[int], budget: int, groups: Sequence[int] | None = None,
                  prefix: Mapping[int, int] | None = None) -> list[list[int]]:
    """`pack_rows` at the smallest budget that needs no more rows than `budget` does (a bisection): rows are
    padded to the longest, so 2 rows of 250 and 250 tokens cost less than 2 of 400 and 100."""
    rows = best = pack_rows(lengths, budget, groups, prefix)
    low, high = max(lengths), budget  # best: pack_rows at `high`, as few rows as at `budget`
    while low < high:
        middle = (low + high) // 2
        candidate = pack_rows(lengths, middle, groups, prefix)
        if len(candidate) <= len(rows):
            high, best = middle, candidate
        else:
            low = middle + 1
    return best


def pack_pairs(sequences: Sequence[Sequence[int]], score_at: Sequence[int], pad_value: int,
               budget: int = PACKED_LENGTH, multiple: int | None = 8,
               labels: Sequence[Sequence[int]] | None = None, label_pad: int = IGNORE_INDEX,
               groups: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """Pairs packed into rows of at most `budget` tokens (`pack_rows`), right-padded to a common width (a
    multiple of `multiple`): {input_ids, position_ids, scored_pair[, labels][, pair_ids]} as [R, W].

    `scored_pair` holds pair i's index at its score token `score_at[i]` (the token that predicts the
    answer), -1 elsewhere. `groups[i]` is pair i's group: pairs of a group share their common prefix
    (module docstring). A row's trailing padding restarts its position ids at 0.
    """
    lengths = [len(seq) for seq in sequences]
    group_of = list(groups) if groups is not None else list(range(len(sequences)))
    members: dict[int, list[int]] = {}
    for i, g in enumerate(group_of):
        members.setdefault(g, []).append(i)
    prefix = {g: shared_prefix_length([sequences[i] for i in m], [score_at[i] for i in m]) for g, m in members.items()}
    rows = balanced_rows(lengths, budget, group_of, prefix)
    width = max(sum(lengths[i] - prefix[group_of[i]] for i in row) + sum(prefix[g] for g in {group_of[i] for i in row})
                for row in rows)
    if multiple:
        width = math.ceil(width / multiple) * multiple
    shape = (len(rows), width)
    input_ids = np.full(shape, pad_value, dtype=np.int64)
    position_ids = np.zeros(shape, dtype=np.int64)
    scored_pair = np.full(shape, -1, dtype=np.int64)
    pair_ids = np.full(shape, -1, dtype=np.int64)
    packed_labels = np.full(shape, label_pad, dtype=np.int64) if labels is not None else None
    for r, row in enumerate(rows):
        col = 0
        for g, chunk in itertools.groupby(sorted(row, key=lambda i: (group_of[i], i)), key=group_of.__getitem__):
            chunk, q = list(chunk), prefix[g]
            spans = [(chunk[0], 0, q, -1)] + [(i, q, lengths[i], i) for i in chunk]  # (pair, from, to, owner)
            for i, start, stop, owner in spans:
                stop_col = col + stop - start
                input_ids[r, col:stop_col] = sequences[i][start:stop]
                position_ids[r, col:stop_col] = np.arange(start, stop)
                pair_ids[r, col:stop_col] = owner
                if packed_labels is not None:
                    packed_labels[r, col:stop_col] = labels[i][start:stop]
                if owner >= 0:
                    scored_pair[r, col + score_at[i] - start] = i
                col = stop_col
        position_ids[r, col:] = np.arange(width - col)
    out = {"input_ids": input_ids, "position_ids": position_ids, "scored_pair": scored_pair}
    if packed_labels is not None:
        out["labels"] = packed_labels
    if any(prefix.values()):
        out["pair_ids"] = pair_ids
    return {k: torch.from_numpy(v) for k, v in out.items()}
