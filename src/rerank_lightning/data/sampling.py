"""Group sampling (SPEC 2): a pure function of (seed, epoch, record index)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from .records import TrainRecord


def record_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The generator for one record in one epoch; independent of workers, devices and history.

    Seeded from the string key (hashed with SHA-512 by `random`), so it is the same in every
    process and Python run; cheaper to build than a numpy generator, which matters once per group.
    """
    return random.Random(f"{seed}/{epoch}/{index}")


@dataclass(frozen=True)
class Group:
    """One training group: the positive first, then G - 1 negatives.

    `positive_index` and `negative_indices` say which of the record's `pos` / `neg` were chosen,
    so that pre-tokenised passages can be picked by index.
    """

    query: str
    passages: tuple[str, ...]
    teacher_scores: tuple[float, ...] | None
    prompt: str | None
    positive_index: int = 0
    negative_indices: tuple[int, ...] = ()
    grades: tuple[float, ...] | None = None  # graded labels, when the record has some


def sample_without_replacement(rng: random.Random, population: int, k: int) -> list[int]:
    """k distinct values of range(population), uniformly: a partial Fisher-Yates shuffle (cheaper
    than `random.sample`, whose per-draw method calls cost more than the rest of a training item)."""
    pool = list(range(population))
    for i in range(k):
        j = i + int(rng.random() * (population - i))
        pool[i], pool[j] = pool[j], pool[i]
    return pool[:k]


def sample_indices(num_pos: int, num_neg: int, group_size: int, seed: int, epoch: int,
                   index: int) -> tuple[int, tuple[int, ...]]:
    """(positive index, G - 1 negative indices) for record `index` in `epoch` (SPEC 2)."""
    rng = record_rng(seed, epoch, index)
    p = int(rng.random() * num_pos)
    n_neg = group_size - 1
    if n_neg == 0:
        return p, ()
    if num_neg >= n_neg:
        return p, tuple(sample_without_replacement(rng, num_neg, n_neg))
    # Too few negatives: repeat the list ceil((G-1)/n) times, then sample without replacement,
    # so each negative appears at most that many times (position k of the repeated list is k % n).
    repeats = math.ceil(n_neg / num_neg)
    return p, tuple(k % num_neg for k in sample_without_replacement(rng, num_neg * repeats, n_neg))


def sample_group(record: TrainRecord, group_size: int, seed: int, epoch: int, index: int) -> Group:
    """Pick one positive and G - 1 negatives; teacher scores follow their passages by index."""
    p, neg_idx = sample_indices(len(record.pos), len(record.neg), group_size, seed, epoch, index)
    passages = (record.pos[p], *[record.neg[j] for j in neg_idx])
    scores = None
    if record.has_teacher_scores:
        scores = (record.pos_scores[p], *[record.neg_scores[j] for j in neg_idx])
    grades = None
    if record.pos_grades is not None or record.neg_grades is not None:
        pos_grades = record.pos_grades or (1.0,) * len(record.pos)
        neg_grades = record.neg_grades or (0.0,) * len(record.neg)
        grades = (pos_grades[p], *[neg_grades[j] for j in neg_idx])
    return Group(record.query, passages, scores, record.prompt, p, neg_idx, grades)


class GroupSampler(DistributedSampler):
    """Yields (epoch, record index) keys: a seeded shuffle per epoch, sharded across ranks.

    The dataset reads the epoch from the key, so persistent or forked dataloader workers always
    sample the same groups as a single process would. Lightning calls `set_epoch` each epoch,
    and leaves a `DistributedSampler` in place rather than wrapping it (which would shard twice);
    `DistributedSampler.__init__` is not called because it needs a dataset and a process group.
    """

    def __init__(self, num_records: int, seed: int = 42, shuffle: bool = True,
                 num_replicas: int | None = None, rank: int | None = None, drop_last: bool = False):
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.num_records, self.seed, self.shuffle = num_records, seed, shuffle
        self.num_replicas, self.rank, self.drop_last = num_replicas, rank, drop_last
        self.epoch = 0
        self.skip = 0  # samples of the current epoch already consumed on this rank (resume)
        if drop_last:
            self.per_rank = num_records // num_replicas
        else:
            self.per_rank = math.ceil(num_records / num_replicas)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0
        self.epoch = epoch

    def __len__(self) -> int:
        # The epoch's full length even while resuming: Lightning sizes every epoch from the first len()
        # and continues the batch index from the checkpoint, so only the iterator skips.
        return self.per_rank

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_records).tolist()
        else:
            order = list(range(self.num_records))
        total = self.per_rank * self.num_replicas
        order = (order * math.ceil(total / max(len(order), 1)))[:total]  # pad like DistributedSampler
        mine = order[self.rank : total : self.num_replicas]
        for index in mine[self.skip :]:
            yield self.epoch, index
        self.skip = 0
