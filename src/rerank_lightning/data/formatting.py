"""The instruction recipe's token layout (SPEC 3): the one place that turns text into input ids.

Training, validation, export and inference all build sequences through `PairFormatter`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT_PROMPT = (
    "Given a query A and a passage B, determine whether the passage contains an answer to the "
    "query by providing a prediction of either 'Yes' or 'No'."
)
SEPARATOR = "\n"
YES, NO = "Yes", "No"


class FormatConfigError(ValueError):
    """The lengths, prompt or tokenizer cannot produce a valid sequence."""


def pad_token_id(tokenizer: Any) -> int:
    """SPEC 3: the tokenizer's own pad token, else unk, else eos."""
    for tid in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise FormatConfigError("tokenizer has no pad, unk or eos token to pad with")


def ensure_pad_token(tokenizer: Any) -> Any:
    """Give the tokenizer a pad token (SPEC 3 order) so `tokenizer.pad` and export agree."""
    if tokenizer.pad_token_id is None:
        tid = pad_token_id(tokenizer)
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(tid)
    return tokenizer


def single_token_id(tokenizer: Any, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise FormatConfigError(
            f"{text!r} must be a single token for the yes/no score, but this tokenizer splits it into "
            f"{len(ids)} tokens {ids}"
        )
    return int(ids[0])


@dataclass
class PairFormatter:
    """Builds `[BOS] A: query \\n B: passage \\n prompt [label]` with SPEC 3 truncation."""

    tokenizer: Any
    query_max_len: int = 32
    passage_max_len: int = 128
    query_instruction: str = "A: "
    passage_instruction: str = "B: "
    prompt: str = DEFAULT_PROMPT
    _prompt_cache: dict[str, list[int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        tok = self.tokenizer
        self.sep_ids: list[int] = tok(SEPARATOR, add_special_tokens=False)["input_ids"]
        self.yes_id = single_token_id(tok, YES)
        self.no_id = single_token_id(tok, NO)
        self.pad_id = pad_token_id(tok)
        bos = tok.bos_token_id
        self.bos_ids: list[int] = [int(bos)] if bos is not None and bos != self.pad_id else []
        self.check_prompt(self.prompt)

    @property
    def max_length(self) -> int:
        return self.query_max_len + self.passage_max_len

    def prompt_ids(self, prompt: str | None = None) -> list[int]:
        prompt = self.prompt if prompt is None else prompt
        ids = self._prompt_cache.get(prompt)
        if ids is None:
            ids = self._prompt_cache[prompt] = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return ids

    def budget(self, prompt: str | None = None) -> int:
        """Tokens left for `first + second` once the separator, prompt and answer are placed."""
        return self.max_length - (len(self.prompt_ids(prompt)) + 1) - len(self.sep_ids)

    def check_prompt(self, prompt: str | None = None) -> None:
        """Setup check: even an empty query and passage must fit in Q + P (SPEC 3)."""
        budget = self.budget(prompt)
        needed = len(self.bos_ids) + len(self.sep_ids)
        if budget < needed:
            n_prompt = len(self.prompt_ids(prompt))
            raise FormatConfigError(
                f"query_max_len + passage_max_len = {self.query_max_len} + {self.passage_max_len} = "
                f"{self.max_length} tokens cannot hold the prompt ({n_prompt} tokens), the answer token, "
                f"two separators ({len(self.sep_ids)} tokens each) and BOS ({len(self.bos_ids)}): "
                f"raise the lengths to at least {self.max_length - budget + needed} in total or shorten the prompt"
            )

    def query_ids(self, query: str) -> list[int]:
        ids = self.tokenizer(self.query_instruction + query, add_special_tokens=False)["input_ids"]
        return ids[: self.query_max_len + self.passage_max_len // 4]

    def passage_ids(self, passage: str) -> list[int]:
        ids = self.tokenizer(self.passage_instruction + passage, add_special_tokens=False)["input_ids"]
        return ids[: self.passage_max_len + self.query_max_len // 2]

    def build(self, query_ids: list[int], passage_ids: list[int], prompt: str | None = None,
              label: int | None = None) -> list[int]:
        """Input ids of one pair; `label` (a token id) is appended for training, omitted for scoring."""
        budget = self.budget(prompt)
        first = self.bos_ids + query_ids
        if len(first) >= budget:
            # FlagEmbedding emits an over-long sequence here; SPEC 3 cuts the query instead,
            # leaving the passage up to half of the room after BOS and separator.
            room = budget - len(self.bos_ids) - len(self.sep_ids)
            keep_passage = min(len(passage_ids), room // 2)
            first = first[: budget - len(self.sep_ids) - keep_passage]
        second = (self.sep_ids + passage_ids)[: budget - len(first)]
        ids = first + second + self.sep_ids + self.prompt_ids(prompt)
        return ids + [label] if label is not None else ids

    def encode_pair(self, query: str, passage: str, prompt: str | None = None,
                    label: int | None = None) -> list[int]:
        return self.build(self.query_ids(query), self.passage_ids(passage), prompt, label)

    @classmethod
    def from_recipe(cls, tokenizer: Any, recipe: dict[str, Any]) -> "PairFormatter":
        """The formatter a `recipe()` describes; the tokenizer must give the recorded Yes/No ids."""
        fmt = cls(tokenizer, recipe["query_max_len"], recipe["passage_max_len"], recipe["query_instruction"],
                  recipe["passage_instruction"], recipe["prompt"])
        if (fmt.yes_id, fmt.no_id) != (recipe["yes_token_id"], recipe["no_token_id"]):
            raise FormatConfigError(f"tokenizer's Yes/No ids {fmt.yes_id}/{fmt.no_id} differ from the recipe's "
                                    f"{recipe['yes_token_id']}/{recipe['no_token_id']}")
        return fmt

    def recipe(self) -> dict[str, Any]:
        """The facts an exported model needs to format pairs exactly as in training (SPEC 9)."""
        return {
            "recipe": "instruction",
            "query_instruction": self.query_instruction,
            "passage_instruction": self.passage_instruction,
            "prompt": self.prompt,
            "separator": SEPARATOR,
            "query_max_len": self.query_max_len,
            "passage_max_len": self.passage_max_len,
            "yes_token_id": self.yes_id,
            "no_token_id": self.no_id,
            "pad_token_id": self.pad_id,
            "bos_token_id": self.bos_ids[0] if self.bos_ids else None,
        }
