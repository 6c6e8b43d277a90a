"""Group sampling (SPEC 2): what a group holds, and randomness that is a pure function of (seed, epoch, i)."""

from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from rerank_lightning.data import (
    DataArguments,
    GroupSampler,
    RerankCollator,
    TrainDatasetForReranker,
    TrainRecord,
    sample_group,
)


def record(n_pos: int, n_neg: int, scores: bool = True, prompt: str | None = None) -> TrainRecord:
    pos = tuple(f"pos{k}" for k in range(n_pos))
    neg = tuple(f"neg{k}" for k in range(n_neg))
    if not scores:
        return TrainRecord("q", pos, neg, prompt=prompt)
    return TrainRecord("q", pos, neg, tuple(100.0 + k for k in range(n_pos)), tuple(float(k) for k in range(n_neg)),
                       prompt)


SCORE_OF = {**{f"pos{k}": 100.0 + k for k in range(10)}, **{f"neg{k}": float(k) for k in range(50)}}


@pytest.mark.parametrize("G", [1, 2, 8, 16])
def test_positive_first_then_distinct_negatives_when_enough(G):
    """SPEC 2: G passages, one positive first, then G - 1 negatives sampled without replacement."""
    rec = record(n_pos=3, n_neg=25)
    for index in range(50):
        group = sample_group(rec, G, seed=42, epoch=0, index=index)
        assert len(group.passages) == G
        assert group.passages[0] in rec.pos
        negs = group.passages[1:]
        assert all(p in rec.neg for p in negs)
        assert len(set(negs)) == G - 1
        assert group.query == rec.query


def test_positive_is_a_uniform_choice():
    """SPEC 2: the positive is one uniform choice from `pos`."""
    rec = record(n_pos=3, n_neg=4)
    counts = Counter(sample_group(rec, 2, seed=7, epoch=e, index=i).passages[0]
                     for e in range(30) for i in range(100))
    assert set(counts) == set(rec.pos)
    for c in counts.values():
        assert abs(c / 3000 - 1 / 3) < 0.04


def test_negatives_cover_the_list_uniformly_over_epochs():
    """SPEC 2: a sample, not a fixed prefix: over many draws every negative is used about equally."""
    rec = record(n_pos=1, n_neg=10)
    counts = Counter(p for e in range(200) for p in sample_group(rec, 4, seed=0, epoch=e, index=0).passages[1:])
    assert set(counts) == set(rec.neg)
    assert max(counts.values()) - min(counts.values()) < 0.5 * 60  # expected 60 each


@pytest.mark.parametrize("n_neg,G", [(1, 8), (2, 8), (3, 8), (3, 5), (5, 16), (7, 8)])
def test_few_negatives_repeat_at_most_ceil_times(n_neg, G):
    """SPEC 2: with fewer than G - 1 negatives, G - 1 are still drawn and each appears at most
    ceil((G-1)/len(neg)) times (sampling without replacement from the repeated list)."""
    rec = record(n_pos=1, n_neg=n_neg)
    cap = math.ceil((G - 1) / n_neg)
    for index in range(100):
        group = sample_group(rec, G, seed=3, epoch=1, index=index)
        negs = group.passages[1:]
        assert len(negs) == G - 1
        counts = Counter(negs)
        assert set(counts) <= set(rec.neg)
        assert max(counts.values()) <= cap
        if (G - 1) == n_neg * cap:  # the whole repeated list is drawn
            assert all(counts[n] == cap for n in rec.neg)


def test_teacher_scores_follow_their_passages():
    """SPEC 2: teacher scores travel with their passages by index (also with repeated negatives)."""
    for n_neg, G in ((25, 8), (3, 8)):
        rec = record(n_pos=4, n_neg=n_neg)
        for index in range(40):
            group = sample_group(rec, G, seed=11, epoch=2, index=index)
            assert group.teacher_scores is not None
            assert list(group.teacher_scores) == [SCORE_OF[p] for p in group.passages]
    assert sample_group(record(2, 5, scores=False), 4, 0, 0, 0).teacher_scores is None


def test_group_keeps_the_record_prompt():
    """SPEC 1/2: the record's prompt travels with its group (None when absent)."""
    assert sample_group(record(1, 3, prompt="Yes or No?"), 4, 0, 0, 0).prompt == "Yes or No?"
    assert sample_group(record(1, 3), 4, 0, 0, 0).prompt is None


def test_sample_group_is_a_pure_function_of_seed_epoch_index():
    """SPEC 2: same (seed, epoch, i) -> same group, whatever the global random state or the
    calls made before; another epoch, seed or index gives (usually) another group."""
    rec = record(n_pos=3, n_neg=25)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    first = sample_group(rec, 8, seed=42, epoch=3, index=17)
    for k in range(20):
        sample_group(rec, 8, seed=k, epoch=k, index=k)
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    assert sample_group(rec, 8, seed=42, epoch=3, index=17) == first
    by_epoch = {sample_group(rec, 8, seed=42, epoch=e, index=17).passages for e in range(10)}
    by_index = {sample_group(rec, 8, seed=42, epoch=3, index=i).passages for i in range(10)}
    by_seed = {sample_group(rec, 8, seed=s, epoch=3, index=17).passages for s in range(10)}
    assert len(by_epoch) >= 9 and len(by_index) >= 9 and len(by_seed) >= 9


@pytest.fixture(scope="module")
def normal_args(shared_data) -> DataArguments:
    path = shared_data / "flagembedding" / "reranker_normal_examples.jsonl"
    return DataArguments(train_data=str(path), train_group_size=4, query_max_len=16, passage_max_len=48, seed=5)


def test_dataset_item_depends_only_on_epoch_and_index(mistral_tokenizer, normal_args):
    """SPEC 2: `dataset[(epoch, i)]` is the same whatever was read before, and the same as a
    freshly built dataset's; an int index uses the epoch set with `set_epoch`."""
    ds = TrainDatasetForReranker(normal_args, mistral_tokenizer)
    fresh = TrainDatasetForReranker(normal_args, mistral_tokenizer)
    target = fresh[(2, 7)]
    keys = [(e, i) for e in range(4) for i in range(len(ds))]
    random.Random(0).shuffle(keys)
    for key in keys[:25]:
        ds[key]
    assert ds[(2, 7)] == target
    ds.set_epoch(2)
    assert ds[7] == target
    assert ds[(0, 7)] != target  # another epoch draws other negatives (25 to pick 3 from)
    ds.set_epoch(0)
    assert ds[7] == ds[(0, 7)] != target


def _batches(loader: DataLoader, sampler: GroupSampler, epochs: int) -> list[dict]:
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        out.extend(loader)
    return out


def _assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["group_size"] == y["group_size"]
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(x["pair"][key], y["pair"][key])
        assert torch.equal(x["teacher_scores"], y["teacher_scores"])


def test_dataloader_workers_do_not_change_the_batches(mistral_tokenizer, normal_args):
    """SPEC 2: the batches are the same with 0 or 2 (persistent) dataloader workers, epoch after epoch."""
    ds = TrainDatasetForReranker(normal_args, mistral_tokenizer)
    collate = RerankCollator(mistral_tokenizer, normal_args.query_max_len, normal_args.passage_max_len)
    runs = []
    for workers in (0, 2):
        sampler = GroupSampler(len(ds), seed=normal_args.seed)
        loader = DataLoader(ds, batch_size=3, sampler=sampler, collate_fn=collate, num_workers=workers,
                            persistent_workers=workers > 0)
        runs.append(_batches(loader, sampler, epochs=2))
    _assert_same_batches(*runs)
    # and the two epochs really differ (shuffled order and resampled negatives)
    per_epoch = math.ceil(len(ds) / 3)
    assert not torch.equal(runs[0][0]["pair"]["input_ids"], runs[0][per_epoch]["pair"]["input_ids"])


def test_sampler_yields_epoch_keys_of_a_seeded_permutation():
    """SPEC 2: the sampler yields (epoch, index) keys; each epoch is a seeded shuffle of all records."""
    sampler = GroupSampler(10, seed=3, num_replicas=1, rank=0)
    keys = list(sampler)
    assert len(sampler) == 10 and all(e == 0 for e, _ in keys)
    order0 = [i for _, i in keys]
    assert sorted(order0) == list(range(10)) and order0 != list(range(10))
    assert [i for _, i in GroupSampler(10, seed=3, num_replicas=1, rank=0)] == order0
    assert [i for _, i in GroupSampler(10, seed=4, num_replicas=1, rank=0)] != order0
    assert [i for _, i in GroupSampler(10, shuffle=False, num_replicas=1, rank=0)] == list(range(10))


def test_sampler_shards_cover_every_record_once_per_epoch():
    """SPEC 2: with 2 devices, the ranks' shards are disjoint and together cover every record
    exactly once per epoch; `set_epoch` reshuffles."""
    n = 14
    samplers = [GroupSampler(n, seed=42, num_replicas=2, rank=r) for r in range(2)]
    seen = []
    for epoch in range(3):
        shards = []
        for s in samplers:
            s.set_epoch(epoch)
            keys = list(s)
            assert len(keys) == len(s) == n // 2
            assert all(e == epoch for e, _ in keys)
            shards.append([i for _, i in keys])
        assert sorted(shards[0] + shards[1]) == list(range(n))
        seen.append(shards)
    assert seen[0] != seen[1] != seen[2]
    assert seen[0][0] != seen[1][0] and seen[0][1] != seen[1][1]


def test_sampler_pads_an_uneven_split_like_distributed_sampler():
    """SPEC 2: with n not divisible by the number of ranks, every rank gets the same number of
    keys and every record is still seen."""
    shards = [[i for _, i in GroupSampler(7, seed=1, num_replicas=2, rank=r)] for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 4
    assert set(shards[0]) | set(shards[1]) == set(range(7))


def test_sampler_resumes_mid_epoch_with_the_remaining_keys():
    """SPEC 2: a resumed run sees exactly what an uninterrupted run would have: skipping the
    consumed keys of the epoch yields the rest, and the next epoch is whole again."""
    full = GroupSampler(12, seed=9, num_replicas=2, rank=1)
    full.set_epoch(1)
    keys = list(full)
    resumed = GroupSampler(12, seed=9, num_replicas=2, rank=1)
    resumed.set_epoch(1)
    resumed.skip = 2
    assert len(resumed) == len(keys)  # the epoch's length: Lightning sizes every later epoch from it
    assert list(resumed) == keys[2:]
    resumed.set_epoch(2)
    full.set_epoch(2)
    assert list(resumed) == list(full) and len(resumed) == 6
