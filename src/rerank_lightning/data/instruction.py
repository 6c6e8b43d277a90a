"""The instruction recipe's dataset and collator, API-compatible with FlagEmbedding's LLM reranker."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from .formatting import DEFAULT_PROMPT, PairFormatter, pad_token_id
from .records import load_records
from .sampling import sample_group

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

    def formatter(self, tokenizer: Any) -> PairFormatter:
        return PairFormatter(
            tokenizer,
            query_max_len=self.query_max_len,
            passage_max_len=self.passage_max_len,
            query_instruction=self.query_instruction_for_retrieval,
            passage_instruction=self.passage_instruction_for_retrieval,
            prompt=self.prompt,
        )


class TrainDatasetForReranker(Dataset):
    """Item i is one group of G encoded pairs, positive first (SPEC 2, 3).

    Index with an int (uses `self.epoch`) or with the `(epoch, i)` keys of `GroupSampler`.
    Each encoding holds `input_ids`, `attention_mask`, `labels` and, when the record has
    teacher scores, `teacher_score`.
    """

    def __init__(self, args: DataArguments, tokenizer: Any, formatter: PairFormatter | None = None):
        if args.train_group_size < 1:
            raise ValueError(f"train_group_size must be >= 1, got {args.train_group_size}")
        self.args = args
        self.formatter = formatter or args.formatter(tokenizer)
        self.records, self.load_report = load_records(
            args.train_data,
            need_negatives=args.train_group_size > 1,
            max_example_num_per_dataset=args.max_example_num_per_dataset,
            seed=args.seed,
            on_error=args.on_error,
        )
        for prompt in {r.prompt for r in self.records if r.prompt is not None}:
            self.formatter.check_prompt(prompt)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, key: int | tuple[int, int]) -> list[dict[str, Any]]:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        group = sample_group(self.records[index], self.args.train_group_size, self.args.seed, epoch, index)
        fmt = self.formatter
        query_ids = fmt.query_ids(group.query)
        encodings = []
        for j, passage in enumerate(group.passages):
            label = fmt.yes_id if j == 0 else fmt.no_id
            ids = fmt.build(query_ids, fmt.passage_ids(passage), group.prompt, label)
            enc = {
                "input_ids": ids,
                "attention_mask": [1] * len(ids),
                "labels": [IGNORE_INDEX] * (len(ids) - 1) + [label],
            }
            if group.teacher_scores is not None:
                enc["teacher_score"] = group.teacher_scores[j]
            encodings.append(enc)
        return encodings


def pad_batch(sequences: Sequence[Sequence[int]], pad_value: int, side: str = "left",
              multiple: int | None = 8) -> torch.Tensor:
    """Stack lists of ids into [N, L], L the longest rounded up to `multiple`."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    length = max(len(s) for s in sequences)
    if multiple:
        length = math.ceil(length / multiple) * multiple
    out = torch.full((len(sequences), length), pad_value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            if side == "left":
                out[row, length - len(seq) :] = torch.as_tensor(seq)
            else:
                out[row, : len(seq)] = torch.as_tensor(seq)
    return out


@dataclass
class RerankCollator:
    """B groups -> `{"pair": {input_ids, attention_mask, labels}, "group_size", "teacher_scores"}` (SPEC 5).

    Rows are query-major: group b is rows b*G .. b*G+G-1. `teacher_scores` is [B, G] (NaN for a
    group whose record has none) and present only when some group has scores.
    """

    tokenizer: Any = None
    query_max_len: int = 32
    passage_max_len: int = 128
    pad_to_multiple_of: int | None = 8
    padding_side: str | None = None  # None: the tokenizer's own
    label_pad_token_id: int = IGNORE_INDEX
    return_tensors: str = "pt"
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
        side, multiple = self.padding_side, self.pad_to_multiple_of
        pair = {
            "input_ids": pad_batch([e["input_ids"] for e in flat], self.pad_id, side, multiple),
            "attention_mask": pad_batch([e["attention_mask"] for e in flat], 0, side, multiple),
        }
        if "labels" in flat[0]:
            pair["labels"] = pad_batch([e["labels"] for e in flat], self.label_pad_token_id, side, multiple)
        batch: dict[str, Any] = {"pair": pair, "group_size": sizes.pop()}
        if any("teacher_score" in e for e in flat):
            scores = [e.get("teacher_score", float("nan")) for e in flat]
            batch["teacher_scores"] = torch.tensor(scores, dtype=torch.float32).view(len(groups), -1)
        return batch
