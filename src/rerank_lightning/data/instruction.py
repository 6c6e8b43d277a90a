"""The instruction recipe's dataset and collator, API-compatible with FlagEmbedding's LLM reranker."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from .formatting import DEFAULT_PROMPT, PairFormatter, pad_token_id
from .padding import pad_batch, real_token_mask
from .tokenized import PretokenizedGroups, default_cache_dir

IGNORE_INDEX = -100


@dataclass
class DataArguments:
    """FlagEmbedding's data arguments (same names and defaults) plus this project's extras."""

    train_data: Any = None
    train_group_size: int = 8
    query_max_len: int = 32
    passage_max_len: int = 128
    query_instruction_for_retrieval: str = "A: "
    passage_instruction_for_retrieval: str = "B: "
    max_example_num_per_dataset: int | None = None
    prompt: str = DEFAULT_PROMPT
    seed: int = 42
    on_error: str = "raise"  # "skip": drop bad records, counting and reporting them (SPEC 1)
    padding_side: str = "left"
    pad_to_multiple_of: int | None = 8
    cache_dir: str | None = field(default_factory=default_cache_dir)  # pre-tokenised records; None: no cache
    formatter_class: ClassVar[type[PairFormatter]] = PairFormatter

    def formatter(self, tokenizer: Any) -> PairFormatter:
        return self.formatter_class(
            tokenizer,
            query_max_len=self.query_max_len,
            passage_max_len=self.passage_max_len,
            query_instruction=self.query_instruction_for_retrieval,
            passage_instruction=self.passage_instruction_for_retrieval,
            prompt=self.prompt,
        )


class TrainDatasetForReranker(PretokenizedGroups):
    """Item i is one group of G encoded pairs, positive first (SPEC 2, 3), from pre-tokenised records.

    Index with an int (uses `self.epoch`) or with the `(epoch, i)` keys of `GroupSampler`.
    Each encoding holds `input_ids`, `attention_mask`, `labels` and, when the record has
    teacher scores, `teacher_score`.
    """

    def __getitem__(self, key: int | tuple[int, int]) -> list[dict[str, Any]]:
        group, query_ids, passages, prompt_ids = self.group_tokens(key)
        fmt = self.formatter
        labels = [fmt.yes_id] + [fmt.no_id] * (len(passages) - 1)
        encodings = []
        for (ids, _, _), label in zip(fmt.layout_group(query_ids, passages, prompt_ids, labels), labels):
            label_row = [IGNORE_INDEX] * len(ids)
            label_row[-1] = label
            encodings.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": label_row})
        if group.teacher_scores is not None:
            for enc, score in zip(encodings, group.teacher_scores):
                enc["teacher_score"] = score
        if group.grades is not None:
            for enc, grade in zip(encodings, group.grades):
                enc["grade"] = grade
        return encodings


def _counts(rows: Sequence[Any], value: int) -> list[int] | None:
    """How often `value` occurs in each row (lists only: None otherwise), counted in C."""
    if not all(type(row) is list for row in rows):
        return None
    return list(map(list.count, rows, itertools.repeat(value)))


def _all_ones(masks: Sequence[Any], lengths: list[int]) -> bool:
    return list(map(len, masks)) == lengths and _counts(masks, 1) == lengths


def _labelled_last_only(labels: Sequence[Any], lengths: list[int], ignore: int) -> bool:
    return (0 not in lengths and list(map(len, labels)) == lengths
            and _counts(labels, ignore) == [n - 1 for n in lengths] and ignore not in [row[-1] for row in labels])


def pack_rows(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """First-fit decreasing: the pair indices of each row, a row's lengths summing to at most `budget`
    (a pair longer than the budget gets a row of its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(budget - lengths[i])
    return rows


def pack_pairs(sequences: Sequence[Sequence[int]], score_at: Sequence[int], pad_value: int,
               budget: int = 256, multiple: int | None = 8,
               labels: Sequence[Sequence[int]] | None = None, label_pad: int = IGNORE_INDEX) -> dict[str, torch.Tensor]:
    """Pairs packed into as few rows of at most `budget` tokens as first-fit decreasing finds, rows
    right-padded to a common width (a multiple of `multiple`).

    `position_ids` restart at 0 for each pair (and for a row's trailing padding): with no attention mask,
    transformers reads them as packed sequences and keeps attention within each pair (a block-diagonal
    causal mask for sdpa/eager, varlen kernels for flash attention). `scored_pair` [R, W] holds pair i's
    index at its score token `score_at[i]` (the token that predicts the answer), -1 elsewhere.
    """
    lengths = [len(seq) for seq in sequences]
    rows = pack_rows(lengths, budget)
    width = max(sum(lengths[i] for i in row) for row in rows)
    if multiple:
        width = math.ceil(width / multiple) * multiple
    input_ids = np.full((len(rows), width), pad_value, dtype=np.int64)
    position_ids = np.zeros((len(rows), width), dtype=np.int64)
    scored_pair = np.full((len(rows), width), -1, dtype=np.int64)
    packed_labels = np.full((len(rows), width), label_pad, dtype=np.int64) if labels is not None else None
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            stop = start + lengths[i]
            input_ids[r, start:stop] = sequences[i]
            position_ids[r, start:stop] = np.arange(lengths[i])
            scored_pair[r, start + score_at[i]] = i
            if packed_labels is not None:
                packed_labels[r, start:stop] = labels[i]
            start = stop
        position_ids[r, start:] = np.arange(width - start)
    out = {"input_ids": input_ids, "position_ids": position_ids, "scored_pair": scored_pair}
    if packed_labels is not None:
        out["labels"] = packed_labels
    return {k: torch.from_numpy(v) for k, v in out.items()}


def score_token_index(length: int, labels: Sequence[int] | None, ignore: int = IGNORE_INDEX) -> int:
    """Where a pair's score is read: before its single labelled token, else at its last token (SPEC 3)."""
    if labels is None:
        return length - 1
    if labels[-1] != ignore:
        return length - 2
    return int(np.flatnonzero(np.asarray(labels) != ignore)[0]) - 1


@dataclass
class RerankCollator:
    """B groups -> `{"pair": {input_ids, attention_mask, labels}, "group_size", "teacher_scores", "grades"}` (SPEC 5).

    Rows are query-major: group b is rows b*G .. b*G+G-1. `teacher_scores` is [B, G] (NaN for a
    group whose record has none) and present only when some group has scores.
    With `packing`, `pair` is `pack_pairs`' rows instead ({input_ids, position_ids, scored_pair, labels}:
    no padding between pairs, scores come back in the same query-major order).
    """

    tokenizer: Any = None
    query_max_len: int = 32
    passage_max_len: int = 128
    pad_to_multiple_of: int | None = 8
    padding_side: str | None = None  # None: the tokenizer's own
    label_pad_token_id: int = IGNORE_INDEX
    return_tensors: str = "pt"
    packing: bool = False
    packed_length: int = 256  # tokens per packed row (a longer pair gets a row of its own)
    pad_id: int = field(init=False)

    def __post_init__(self) -> None:
        self.pad_id = pad_token_id(self.tokenizer)
        if self.padding_side is None:
            self.padding_side = getattr(self.tokenizer, "padding_side", None) or "left"

    def __call__(self, features: Sequence[Sequence[dict[str, Any]] | dict[str, Any]]) -> dict[str, Any]:
        groups = [list(g) if isinstance(g, (list, tuple)) else [g] for g in features]
        sizes = {len(g) for g in groups}
        if len(sizes) != 1:
            raise ValueError(f"all groups in a batch must have the same size, got sizes {sorted(sizes)}")
        flat = [enc for g in groups for enc in g]
        if self.packing:
            return self._with_scores(groups, flat, {"pair": self._packed(flat), "group_size": sizes.pop()})
        side, multiple = self.padding_side, self.pad_to_multiple_of
        ids = [e["input_ids"] for e in flat]
        pair = {"input_ids": pad_batch(ids, self.pad_id, side, multiple)}
        # The usual items (all-ones masks; labels -100 but at the last token, SPEC 3) are read off the
        # real-token mask rather than converted list by list: that halves the collation time.
        lengths = [len(i) for i in ids]
        real = real_token_mask(np.array(lengths, dtype=np.int64), pair["input_ids"].shape[1], side)
        masks = [e["attention_mask"] for e in flat]
        if _all_ones(masks, lengths):
            pair["attention_mask"] = torch.from_numpy(real.astype(np.int64))
        else:
            pair["attention_mask"] = pad_batch(masks, 0, side, multiple)
        if "labels" in flat[0]:
            labels, ignore = [e["labels"] for e in flat], self.label_pad_token_id
            if _labelled_last_only(labels, lengths, ignore):
                out = np.full(real.shape, ignore, dtype=np.int64)
                last = real.shape[1] - 1 if side == "left" else np.array(lengths) - 1
                out[np.arange(len(labels)), last] = [row[-1] for row in labels]
                pair["labels"] = torch.from_numpy(out)
            else:
                pair["labels"] = pad_batch(labels, ignore, side, multiple)
        return self._with_scores(groups, flat, {"pair": pair, "group_size": sizes.pop()})

    def _packed(self, flat: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [e["input_ids"] for e in flat]
        labels = [e["labels"] for e in flat] if "labels" in flat[0] else None
        if any(0 in e["attention_mask"] for e in flat):
            raise ValueError("packing needs unpadded pairs (attention masks of ones)")
        ignore = self.label_pad_token_id
        score_at = [score_token_index(len(i), lab, ignore) for i, lab in zip(ids, labels or [None] * len(ids))]
        return pack_pairs(ids, score_at, self.pad_id, self.packed_length, self.pad_to_multiple_of, labels, ignore)

    @staticmethod
    def _with_scores(groups: list[list[dict[str, Any]]], flat: list[dict[str, Any]],
                     batch: dict[str, Any]) -> dict[str, Any]:
        if any("teacher_score" in e for e in flat):
            scores = [e.get("teacher_score", float("nan")) for e in flat]
            batch["teacher_scores"] = torch.tensor(scores, dtype=torch.float32).view(len(groups), -1)
        if any("grade" in e for e in flat):  # graded labels; a group without them: positive 1, negatives 0
            grades = [e.get("grade", float(k % len(groups[0]) == 0)) for k, e in enumerate(flat)]
            batch["grades"] = torch.tensor(grades, dtype=torch.float32).view(len(groups), -1)
        return batch
