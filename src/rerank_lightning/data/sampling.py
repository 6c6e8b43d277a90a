"""Group sampling (SPEC 2): a pure function of (seed, epoch, record index)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from .records import TrainRecord


def record_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one record in one epoch; independent of workers, devices and history."""
    return np.random.default_rng([seed, epoch, index])


@dataclass(frozen=True)
class Group:
    """One training group: the positive first, then G - 1 negatives."""

    query: str
    passages: tuple[str, ...]
    teacher_scores: tuple[float, ...] | None
    prompt: str | None


def sample_group(record: TrainRecord, group_size: int, seed: int, epoch: int, index: int) -> Group:
    """Pick one positive and G - 1 negatives; teacher scores follow their passages by index."""
    rng = record_rng(seed, epoch, index)
    p = int(rng.integers(len(record.pos)))
    n_neg = group_size - 1
    if n_neg == 0:
        neg_idx: list[int] = []
    elif len(record.neg) >= n_neg:
        neg_idx = rng.choice(len(record.neg), size=n_neg, replace=False).tolist()
    else:
        # Too few negatives: repeat the list ceil((G-1)/n) times, then sample without replacement,
        # so each negative appears at most that many times.
        repeats = math.ceil(n_neg / len(record.neg))
        pool = np.tile(np.arange(len(record.neg)), repeats)
        neg_idx = pool[rng.choice(len(pool), size=n_neg, replace=False)].tolist()
    passages = (record.pos[p], *(record.neg[j] for j in neg_idx))
    scores = None
    if record.has_teacher_scores:
        scores = (record.pos_scores[p], *(record.neg_scores[j] for j in neg_idx))
    return Group(record.query, passages, scores, record.prompt)


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
