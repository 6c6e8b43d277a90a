"""Collation (SPEC 5): B groups of G encodings -> one padded [B*G, L] batch, query-major."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from rerank_lightning.data import DataArguments, RerankCollator, TrainDatasetForReranker

G = 4


@pytest.fixture(scope="module")
def scored_ds(mistral_tokenizer, shared_data) -> TrainDatasetForReranker:
    path = shared_data / "flagembedding" / "reranker_normal_examples.jsonl"
    return TrainDatasetForReranker(DataArguments(train_data=str(path), train_group_size=G), mistral_tokenizer)


@pytest.fixture(scope="module")
def unscored_ds(mistral_tokenizer, shared_data) -> TrainDatasetForReranker:
    path = shared_data / "flagembedding" / "llm_reranker_toy_finetune_data.jsonl"
    return TrainDatasetForReranker(DataArguments(train_data=str(path), train_group_size=G), mistral_tokenizer)


def real_tokens(row: torch.Tensor, mask: torch.Tensor) -> list[int]:
    return row[mask.bool()].tolist()


def test_import_paths_and_defaults_match_flagembedding():
    """SPEC 3/5: FlagEmbedding's names import from the package and from `.instruction`, and
    DataArguments keeps FlagEmbedding's defaults."""
    from rerank_lightning.data import DataArguments as A1, RerankCollator as C1, TrainDatasetForReranker as D1
    from rerank_lightning.data.instruction import DataArguments as A2, RerankCollator as C2
    from rerank_lightning.data.instruction import TrainDatasetForReranker as D2

    assert (A1, C1, D1) == (A2, C2, D2)
    args = DataArguments()
    assert args.query_instruction_for_retrieval == "A: "
    assert args.passage_instruction_for_retrieval == "B: "
    assert (args.query_max_len, args.passage_max_len, args.train_group_size) == (32, 128, 8)
    assert args.pad_to_multiple_of == 8


def test_batch_layout_is_query_major_and_padded_to_multiple_of_8(mistral_tokenizer, scored_ds):
    """SPEC 5: `{"pair": {input_ids, attention_mask, labels}, "group_size": G}` as tensors; group b
    is rows b*G .. b*G+G-1 in order; the length is the longest rounded up to 8; labels pad with -100;
    the tokenizer's padding side (left for Mistral) is used by default; pad id is unk (0)."""
    features = [scored_ds[(0, i)] for i in (3, 0, 7)]
    batch = RerankCollator(tokenizer=mistral_tokenizer, query_max_len=32, passage_max_len=128)(features)
    assert set(batch) == {"pair", "group_size", "teacher_scores"}
    assert batch["group_size"] == G
    pair = batch["pair"]
    assert set(pair) == {"input_ids", "attention_mask", "labels"}
    longest = max(len(e["input_ids"]) for g in features for e in g)
    length = math.ceil(longest / 8) * 8
    for key in pair:
        assert isinstance(pair[key], torch.Tensor) and pair[key].dtype == torch.long
        assert pair[key].shape == (3 * G, length)
    for b, group in enumerate(features):
        for j, enc in enumerate(group):
            row = b * G + j
            n = len(enc["input_ids"])
            pad = length - n
            assert pair["input_ids"][row, pad:].tolist() == enc["input_ids"]  # left padding
            assert pair["input_ids"][row, :pad].tolist() == [0] * pad
            assert pair["attention_mask"][row].tolist() == [0] * pad + [1] * n
            assert pair["labels"][row].tolist() == [-100] * pad + enc["labels"]
            assert batch["teacher_scores"][b, j].item() == pytest.approx(enc["teacher_score"])
    # the label sits in the last column for every row under left padding
    assert pair["labels"][:, -1].view(3, G)[:, 0].tolist() == [5592] * 3
    assert (pair["labels"][:, -1].view(3, G)[:, 1:] == 1770).all()


@pytest.mark.parametrize("multiple", [None, 1, 16])
def test_pad_to_multiple_of(mistral_tokenizer, scored_ds, multiple):
    """SPEC 5: padded to the longest, rounded up to `pad_to_multiple_of` (None: exactly the longest)."""
    features = [scored_ds[(1, i)] for i in range(2)]
    batch = RerankCollator(mistral_tokenizer, pad_to_multiple_of=multiple)(features)
    longest = max(len(e["input_ids"]) for g in features for e in g)
    expected = longest if not multiple else math.ceil(longest / multiple) * multiple
    assert batch["pair"]["input_ids"].shape == (2 * G, expected)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_side_keeps_real_tokens_intact(mistral_tokenizer, side):
    """SPEC 5: left or right padding puts the real tokens, intact and in order, at that end;
    the attention mask marks exactly them and labels are -100 on padding."""
    features = [
        [{"input_ids": [1, 10, 11, 12, 5592], "attention_mask": [1] * 5, "labels": [-100] * 4 + [5592]},
         {"input_ids": [1, 10, 1770], "attention_mask": [1] * 3, "labels": [-100] * 2 + [1770]}],
        [{"input_ids": [1, 20, 21, 22, 23, 24, 25, 26, 27, 28, 5592], "attention_mask": [1] * 11,
          "labels": [-100] * 10 + [5592]},
         {"input_ids": [1, 1770], "attention_mask": [1] * 2, "labels": [-100, 1770]}],
    ]
    batch = RerankCollator(mistral_tokenizer, padding_side=side)(features)
    ids, mask, labels = (batch["pair"][k] for k in ("input_ids", "attention_mask", "labels"))
    assert ids.shape == (4, 16)
    assert "teacher_scores" not in batch
    for row, enc in enumerate(e for g in features for e in g):
        n = len(enc["input_ids"])
        real = slice(16 - n, 16) if side == "left" else slice(0, n)
        padding = slice(0, 16 - n) if side == "left" else slice(n, 16)
        assert ids[row, real].tolist() == enc["input_ids"]
        assert real_tokens(ids[row], mask[row]) == enc["input_ids"]
        assert mask[row, real].tolist() == [1] * n and mask[row, padding].tolist() == [0] * (16 - n)
        assert ids[row, padding].tolist() == [0] * (16 - n)
        assert labels[row, real].tolist() == enc["labels"] and labels[row, padding].tolist() == [-100] * (16 - n)


@pytest.mark.parametrize("pad,unk,eos,expected", [(7, 3, 2, 7), (None, 3, 2, 3), (None, None, 2, 2)])
def test_pad_id_is_own_then_unk_then_eos(pad, unk, eos, expected):
    """SPEC 3/5: the collator pads input ids with the tokenizer's pad, else unk, else eos, and
    uses the tokenizer's padding side when none is given."""
    tok = SimpleNamespace(pad_token_id=pad, unk_token_id=unk, eos_token_id=eos, padding_side="right")
    features = [[{"input_ids": [9, 9, 9], "attention_mask": [1, 1, 1], "labels": [-100, -100, 9]}],
                [{"input_ids": [9], "attention_mask": [1], "labels": [9]}]]
    batch = RerankCollator(tok, pad_to_multiple_of=None)(features)
    assert batch["pair"]["input_ids"].tolist() == [[9, 9, 9], [9, expected, expected]]
    assert batch["pair"]["labels"].tolist() == [[-100, -100, 9], [9, -100, -100]]
    assert batch["group_size"] == 1


def test_teacher_scores_are_b_by_g_with_nan_for_groups_without_scores(mistral_tokenizer, scored_ds, unscored_ds):
    """SPEC 5: `teacher_scores` is a float [B, G] tensor following the rows; a group whose record
    has no scores is all NaN; the key is absent when no group has scores."""
    collate = RerankCollator(mistral_tokenizer)
    mixed = [scored_ds[(0, 0)], unscored_ds[(0, 0)], scored_ds[(0, 1)]]
    scores = collate(mixed)["teacher_scores"]
    assert scores.dtype == torch.float32 and scores.shape == (3, G)
    for b in (0, 2):
        assert scores[b].tolist() == pytest.approx([e["teacher_score"] for e in mixed[b]])
    assert torch.isnan(scores[1]).all() and not torch.isnan(scores[[0, 2]]).any()
    assert "teacher_scores" not in collate([unscored_ds[(0, i)] for i in range(3)])
    # a short last batch keeps its real size
    assert collate([scored_ds[(0, 5)]])["teacher_scores"].shape == (1, G)


def test_groups_of_different_sizes_are_rejected(mistral_tokenizer, scored_ds):
    """SPEC 5: the [B, G] reshape uses the batch's real group size, so mixed sizes are an error,
    not a silent regrouping."""
    group = scored_ds[(0, 0)]
    with pytest.raises(ValueError, match="same size"):
        RerankCollator(mistral_tokenizer)([group, group[:-1]])
