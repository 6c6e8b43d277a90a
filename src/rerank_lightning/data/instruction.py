"""The instruction recipe's dataset and collator, API-compatible with FlagEmbedding's LLM reranker."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from .formatting import DEFAULT_PROMPT, PairFormatter, pad_token_id
from .packing import IGNORE_INDEX, PACKED_LENGTH, pack_pairs, score_token_index
from .padding import pad_batch, real_token_mask
from .tokenized import PretokenizedGroups, default_cache_dir


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


@dataclass
class RerankCollator:
    """B groups -> `{"pair": {input_ids, attention_mask, labels}, "group_size", "teacher_scores", "grades"}` (SPEC 5).

    Rows are query-major: group b is rows b*G .. b*G+G-1. `teacher_scores` is [B, G] (NaN for a
    group whose record has none) and present only when some group has scores.
    With `packing`, `pair` is `packing.pack_pairs`' rows instead ({input_ids, position_ids, scored_pair, labels,
    and pair_ids where a group's pairs share a prefix}: no padding between pairs, each group's common prefix
    once per row unless `share_query_prefix` is false; scores come back in the same query-major order).
    """

    tokenizer: Any = None
    query_max_len: int = 32
    passage_max_len: int = 128
    pad_to_multiple_of: int | None = 8
    padding_side: str | None = None  # None: the tokenizer's own
    label_pad_token_id: int = IGNORE_INDEX
    return_tensors: str = "pt"
    packing: bool = False
    packed_length: int = PACKED_LENGTH  # tokens per packed row (a longer pair gets a row of its own)
    share_query_prefix: bool = True  # packed rows hold a group's common prefix once (data.packing)
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
            return self._with_scores(groups, flat, {"pair": self._packed(flat, len(groups)), "group_size": sizes.pop()})
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

    def _packed(self, flat: list[dict[str, Any]], n_groups: int) -> dict[str, torch.Tensor]:
        ids = [e["input_ids"] for e in flat]
        labels = [e["labels"] for e in flat] if "labels" in flat[0] else None
        if any(0 in e["attention_mask"] for e in flat):
            raise ValueError("packing needs unpadded pairs (attention masks of ones)")
        ignore = self.label_pad_token_id
        score_at = [score_token_index(len(i), lab, ignore) for i, lab in zip(ids, labels or [None] * len(ids))]
        size = len(flat) // n_groups if self.share_query_prefix else 1
        return pack_pairs(ids, score_at, self.pad_id, self.packed_length, self.pad_to_multiple_of, labels, ignore,
                          groups=[k // size for k in range(len(flat))])

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
