"""The Matryoshka recipe's dataset and collator (SPEC 4, 5), API-compatible with FlagEmbedding's
`research/Matroyshka_reranker/finetune/self_distillation/data.py`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from . import instruction
from .formatting import MATRYOSHKA_PROMPT, MatryoshkaFormatter
from .tokenized import PretokenizedGroups

MISSING_SCORE = float("nan")  # no teacher score: the KD loss skips the group (FlagEmbedding uses 1)


@dataclass
class DataArguments(instruction.DataArguments):
    """The instruction recipe's arguments with the Matryoshka prompt and right padding."""

    prompt: str = MATRYOSHKA_PROMPT
    padding_side: str = "right"
    formatter_class: ClassVar[type[MatryoshkaFormatter]] = MatryoshkaFormatter


GroupItem = tuple[list[dict[str, list[int]]], list[int], list[int], list[float]]


class TrainDatasetForReranker(PretokenizedGroups):
    """Item i is `(encodings, query_lengths, prompt_lengths, teacher_scores)` for one group of G
    pairs, positive first: encodings hold `input_ids` and `attention_mask`; teacher scores are NaN
    where the record has none."""

    def __init__(self, args: DataArguments, tokenizer: Any, formatter: MatryoshkaFormatter | None = None):
        formatter = formatter or args.formatter(tokenizer)
        if not isinstance(formatter, MatryoshkaFormatter):
            raise TypeError(f"the Matryoshka dataset needs a MatryoshkaFormatter, got {type(formatter).__name__} "
                            f"(give it matryoshka.DataArguments)")
        super().__init__(args, tokenizer, formatter)

    def __getitem__(self, key: int | tuple[int, int]) -> GroupItem:
        group, query_ids, passages, prompt_ids = self.group_tokens(key)
        ids, query_lengths, prompt_lengths = map(list, zip(*self.formatter.layout_group(query_ids, passages, prompt_ids)))
        encodings = [{"input_ids": row, "attention_mask": [1] * len(row)} for row in ids]
        scores = list(group.teacher_scores) if group.teacher_scores is not None else [MISSING_SCORE] * len(passages)
        return encodings, query_lengths, prompt_lengths, scores


@dataclass
class RerankCollator(instruction.RerankCollator):
    """B items -> `{"pair": {input_ids, attention_mask}, "query_lengths": [B*G], "prompt_lengths": [B*G],
    "teacher_scores": [B, G], "group_size": G}`, rows query-major, right-padded by default (SPEC 5)."""

    padding_side: str | None = "right"

    def __call__(self, features: Sequence[GroupItem]) -> dict[str, Any]:  # type: ignore[override]
        batch = super().__call__([item[0] for item in features])
        group_size = batch.pop("group_size")
        batch["query_lengths"] = torch.tensor([n for item in features for n in item[1]], dtype=torch.long)
        batch["prompt_lengths"] = torch.tensor([n for item in features for n in item[2]], dtype=torch.long)
        scores = [s for item in features for s in item[3]]
        batch["teacher_scores"] = torch.tensor(scores, dtype=torch.float32).view(len(features), group_size)
        batch["group_size"] = group_size
        return batch
