"""Pre-tokenised training records: items equal per-item tokenisation; the disk cache is reused only
when tokenizer, settings and records are unchanged; dataloader workers still work."""

from __future__ import annotations

import copy
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import TINY_MODEL

from rerank_lightning.data import DataArguments, GroupSampler, RerankCollator, TrainDatasetForReranker, sample_group
from rerank_lightning.data import tokenized
from rerank_lightning.data.instruction import IGNORE_INDEX

FLAG_FILES = (
    "reranker_normal_examples.jsonl",
    "reranker_prompt_based_examples.jsonl",
    "llm_reranker_toy_finetune_data.jsonl",
)


def per_item_encodings(ds: TrainDatasetForReranker, epoch: int, index: int) -> list[dict]:
    """What the dataset produced before pre-tokenisation: tokenise the query and each sampled
    passage of the group now, with `PairFormatter.encode_pair`."""
    fmt = ds.formatter
    group = sample_group(ds.records[index], ds.args.train_group_size, ds.args.seed, epoch, index)
    out = []
    for j, passage in enumerate(group.passages):
        label = fmt.yes_id if j == 0 else fmt.no_id
        ids = fmt.encode_pair(group.query, passage, group.prompt, label)
        enc = {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE_INDEX] * (len(ids) - 1) + [label]}
        if group.teacher_scores is not None:
            enc["teacher_score"] = group.teacher_scores[j]
        out.append(enc)
    return out


def forbid_tokenising(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("records were tokenised again instead of read from the cache")

    monkeypatch.setattr(tokenized, "tokenize_batch", fail)


@pytest.mark.parametrize("name", FLAG_FILES)
@pytest.mark.parametrize("Q,P,G", [(32, 128, 8), (8, 40, 16)])
def test_items_equal_per_item_tokenisation_on_flagembedding_examples(mistral_tokenizer, shared_data, tmp_path,
                                                                     name, Q, P, G):
    """Every item, in two epochs, is exactly what tokenising inside __getitem__ gives, including
    the small setting where long queries are cut (SPEC 3) and G - 1 > len(neg) (repeats)."""
    args = DataArguments(train_data=str(shared_data / "flagembedding" / name), train_group_size=G,
                         query_max_len=Q, passage_max_len=P, cache_dir=str(tmp_path))
    ds = TrainDatasetForReranker(args, mistral_tokenizer)
    assert len(ds) == 10
    for epoch in (0, 3):
        for i in range(len(ds)):
            assert ds[(epoch, i)] == per_item_encodings(ds, epoch, i), f"record {i}, epoch {epoch}"


def test_items_equal_per_item_tokenisation_on_wikiqa(mistral_tokenizer, shared_data, tmp_path):
    """300 real WikiQA records (long passages are cut to P + Q // 2 and to the budget)."""
    args = DataArguments(train_data=str(shared_data / "wikiqa" / "train_flag.jsonl"), train_group_size=16,
                         max_example_num_per_dataset=300, cache_dir=str(tmp_path))
    ds = TrainDatasetForReranker(args, mistral_tokenizer)
    assert len(ds) == 300
    for i in range(len(ds)):
        assert ds[(1, i)] == per_item_encodings(ds, 1, i), f"record {i}"
    # int keys use the dataset's epoch
    ds.set_epoch(1)
    assert ds[7] == ds[(1, 7)]


def test_store_holds_the_recipe_limits(mistral_tokenizer, shared_data, tmp_path):
    """Queries are stored cut to Q + P // 4 and passages to P + Q // 2 (SPEC 3), prompts whole."""
    Q, P = 8, 40
    args = DataArguments(train_data=str(shared_data / "flagembedding" / "reranker_prompt_based_examples.jsonl"),
                         query_max_len=Q, passage_max_len=P, cache_dir=str(tmp_path))
    ds = TrainDatasetForReranker(args, mistral_tokenizer)
    tok = mistral_tokenizer
    for i, rec in enumerate(ds.records):
        assert ds.tokens.query_ids(i) == tok("A: " + rec.query, add_special_tokens=False)["input_ids"][: Q + P // 4]
        assert ds.tokens.prompt_ids(i) == tok(rec.prompt, add_special_tokens=False)["input_ids"]
        negs = ds.tokens.passage_ids(i, 0, range(len(rec.neg)))[1:]
        assert negs == [tok("B: " + n, add_special_tokens=False)["input_ids"][: P + Q // 2] for n in rec.neg]
    with pytest.raises(IndexError, match="record 0 has 26 passages"):  # 1 positive + 25 negatives
        ds.tokens.passage_ids(0, 0, [25])
    with pytest.raises(IndexError, match="record 0 has 1 positives"):
        ds.tokens.passage_ids(0, 1, [0])


def test_second_construction_reads_the_cache(mistral_tokenizer, shared_data, tmp_path, monkeypatch):
    """The store is written once under cache_dir/ids-<fingerprint>; building the dataset again reads it
    (memory-mapped) without tokenising, and gives the same items."""
    args = DataArguments(train_data=str(shared_data / "flagembedding" / "reranker_normal_examples.jsonl"),
                         cache_dir=str(tmp_path / "cache"))
    first = TrainDatasetForReranker(args, mistral_tokenizer)
    assert not first.tokens.from_cache
    stored = [p for p in (tmp_path / "cache").iterdir()]
    assert [p.name for p in stored] == [f"ids-{first.tokens.fingerprint}"]
    assert sorted(f.name for f in stored[0].iterdir()) == [
        "num_pos.npy", "passage_first.npy", "passage_ids.ids", "passage_ids.starts.npy",
        "prompt_ids.ids", "prompt_ids.starts.npy", "query_ids.ids", "query_ids.starts.npy"]
    forbid_tokenising(monkeypatch)
    again = TrainDatasetForReranker(args, mistral_tokenizer)
    assert again.tokens.from_cache and again.tokens.fingerprint == first.tokens.fingerprint
    assert isinstance(again.tokens.arrays["passage_ids"].ids.base, np.memmap)  # read from the file, not loaded
    assert [again[(2, i)] for i in range(10)] == [first[(2, i)] for i in range(10)]


def test_changed_settings_tokenizer_or_records_do_not_reuse_the_cache(mistral_tokenizer, shared_data, tmp_path,
                                                                      monkeypatch):
    src = shared_data / "flagembedding" / "llm_reranker_toy_finetune_data.jsonl"
    data = tmp_path / "train.jsonl"
    data.write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
    cache = str(tmp_path / "cache")
    base = DataArguments(train_data=str(data), cache_dir=cache)
    reference = TrainDatasetForReranker(base, mistral_tokenizer)
    extended = copy.deepcopy(mistral_tokenizer)
    extended.add_tokens(["<new-token>"])
    variants = {
        "Q": (DataArguments(train_data=str(data), cache_dir=cache, query_max_len=16), mistral_tokenizer),
        "P": (DataArguments(train_data=str(data), cache_dir=cache, passage_max_len=96), mistral_tokenizer),
        "instruction": (DataArguments(train_data=str(data), cache_dir=cache, query_instruction_for_retrieval="Q: "),
                        mistral_tokenizer),
        "prompt": (DataArguments(train_data=str(data), cache_dir=cache, prompt="Is B relevant to A?"),
                   mistral_tokenizer),
        "tokenizer": (base, extended),
    }
    fingerprints = {reference.tokens.fingerprint}
    forbid_tokenising(monkeypatch)
    for what, (args, tok) in variants.items():
        with pytest.raises(AssertionError, match="tokenised again"):
            TrainDatasetForReranker(args, tok)
        fingerprints.add(tokenized.store_fingerprint(reference.records, args.formatter(tok)))
    assert len(fingerprints) == 1 + len(variants)
    # changed records: one passage edited
    lines = data.read_text(encoding="utf-8").splitlines()
    rec = json.loads(lines[3])
    rec["neg"][0] = rec["neg"][0] + " (edited)"
    lines[3] = json.dumps(rec)
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="tokenised again"):
        TrainDatasetForReranker(base, mistral_tokenizer)


def test_no_cache_dir_writes_nothing(mistral_tokenizer, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("RERANK_LIGHTNING_CACHE", str(tmp_path / "env-cache"))
    assert DataArguments().cache_dir == str(tmp_path / "env-cache" / "tokenized")
    args = DataArguments(train_data=str(shared_data / "flagembedding" / "llm_reranker_toy_finetune_data.jsonl"),
                         cache_dir=None)
    ds = TrainDatasetForReranker(args, mistral_tokenizer)
    assert ds.tokens.path is None and not ds.tokens.from_cache
    assert not (tmp_path / "env-cache").exists()
    assert ds[(0, 4)] == per_item_encodings(ds, 0, 4)


def test_unreadable_cache_names_the_folder(mistral_tokenizer, shared_data, tmp_path):
    args = DataArguments(train_data=str(shared_data / "flagembedding" / "llm_reranker_toy_finetune_data.jsonl"),
                         cache_dir=str(tmp_path))
    ds = TrainDatasetForReranker(args, mistral_tokenizer)
    broken = ds.tokens.path
    ids = broken / "passage_ids.ids"
    ids.write_bytes(ids.read_bytes()[:-8])  # two ids short
    with pytest.raises(RuntimeError, match=f"{broken}.*passage_ids.ids holds .* delete this folder"):
        TrainDatasetForReranker(args, mistral_tokenizer)
    for f in broken.iterdir():
        f.write_bytes(b"not numpy")
    with pytest.raises(RuntimeError, match=f"{broken}.*delete this folder"):
        TrainDatasetForReranker(args, mistral_tokenizer)


def test_store_spans_tokenizer_batches(mistral_tokenizer, shared_data, tmp_path, monkeypatch):
    """Records tokenised 3 at a time (ids appended across batches), read back from disk and from memory,
    give exactly the items of tokenising each one now."""
    monkeypatch.setattr(tokenized, "TOKENIZE_BATCH_SIZE", 3)
    for cache in (str(tmp_path / "cache"), None):
        args = DataArguments(train_data=str(shared_data / "flagembedding" / "reranker_prompt_based_examples.jsonl"),
                             train_group_size=4, cache_dir=cache)
        ds = TrainDatasetForReranker(args, mistral_tokenizer)
        assert ds.tokens.from_cache is False
        for i in range(len(ds)):
            assert ds[(0, i)] == per_item_encodings(ds, 0, i)


@pytest.mark.parametrize("on_disk", [True, False])
def test_id_list_writer_keeps_every_list_empty_ones_included(tmp_path, on_disk):
    batches = [[[5, 6], [], [7]], [], [[]], [[8, 9, 10], [2**31 - 1]]]
    writer = tokenized._IdListWriter(tmp_path / "x.ids" if on_disk else None)
    for batch in batches:
        writer.extend(batch)
    column = writer.close()
    if on_disk:
        assert column is None
        column = tokenized.IdLists(np.fromfile(tmp_path / "x.ids", dtype="<i4"), np.load(tmp_path / "x.starts.npy"))
    assert [column[i] for i in range(len(column))] == [ids for batch in batches for ids in batch]


@pytest.mark.parametrize("cached", [True, False])
def test_dataloader_workers_give_the_same_batches(mistral_tokenizer, shared_data, tmp_path, cached):
    """num_workers=2 (forked workers reading the memory-mapped or in-memory store) gives exactly
    the batches of num_workers=0; a pickled dataset (spawned workers) gives the same items."""
    args = DataArguments(train_data=str(shared_data / "flagembedding" / "reranker_normal_examples.jsonl"),
                         train_group_size=4, cache_dir=str(tmp_path) if cached else None)
    ds = TrainDatasetForReranker(args, mistral_tokenizer)
    collate = RerankCollator(mistral_tokenizer)

    def batches(workers: int) -> list[dict]:
        sampler = GroupSampler(len(ds), seed=7, num_replicas=1, rank=0)
        sampler.set_epoch(1)
        loader = DataLoader(ds, batch_size=3, sampler=sampler, collate_fn=collate, num_workers=workers)
        return list(loader)

    single, multi = batches(0), batches(2)
    assert len(single) == len(multi) == 4
    for a, b in zip(single, multi):
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(a["pair"][key], b["pair"][key])
        assert torch.equal(a["teacher_scores"], b["teacher_scores"])
    clone = pickle.loads(pickle.dumps(ds))
    assert [clone[(1, i)] for i in range(10)] == [ds[(1, i)] for i in range(10)]


def test_sample_group_exposes_the_chosen_indices(shared_data):
    """SPEC 2: the group's passages are the record's pos[positive_index] and neg[negative_indices]."""
    from rerank_lightning.data import load_records

    records, _ = load_records(shared_data / "wikiqa" / "train_flag.jsonl", max_example_num_per_dataset=50)
    for i, rec in enumerate(records):
        group = sample_group(rec, 16, 42, 5, i)
        assert group.passages[0] == rec.pos[group.positive_index]
        assert group.passages[1:] == tuple(rec.neg[j] for j in group.negative_indices)
        assert len(group.negative_indices) == 15


def test_training_data_path_imports_neither_datasets_nor_pyarrow(shared_data, tmp_path):
    """Building the training set, tokenising and caching included, loads neither `datasets` nor `pyarrow`
    (with pandas they are about 80 MiB of the training process's memory)."""
    train_data = str(shared_data / "flagembedding" / "reranker_normal_examples.jsonl")
    code = ("import sys\n"
            "from rerank_lightning.data import DataArguments, TrainDatasetForReranker\n"
            "from rerank_lightning.model import load_tokenizer\n"
            f"args = DataArguments(train_data={train_data!r}, cache_dir={str(tmp_path)!r})\n"
            f"ds = TrainDatasetForReranker(args, load_tokenizer({TINY_MODEL!r}))\n"
            "ds[(0, 1)]\n"
            "print([m for m in ('datasets', 'pyarrow', 'pandas') if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
