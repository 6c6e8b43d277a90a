"""The token layouts of both recipes (SPEC 3, 4): the one place that turns text into input ids.

Training, validation, export and inference all build sequences through `PairFormatter` (the
instruction recipe) or `MatryoshkaFormatter` (the Matryoshka recipe).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Sequence

DEFAULT_PROMPT = (
    "Given a query A and a passage B, determine whether the passage contains an answer to the "
    "query by providing a prediction of either 'Yes' or 'No'."
)
MATRYOSHKA_PROMPT = "Predict whether passage B contains an answer to query A."
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


def query_store_len(query_max_len: int, passage_max_len: int) -> int:
    """Query tokens worth keeping ahead of time: the longer of the two recipes' query limits (Q + P // 4)."""
    return query_max_len + passage_max_len // 4


def passage_store_len(query_max_len: int, passage_max_len: int) -> int:
    """Passage tokens worth keeping ahead of time: both recipes cut passages to P + Q // 2."""
    return passage_max_len + query_max_len // 2


class PairLayout(NamedTuple):
    """One pair's input ids and where its parts lie: ids[:query_length] is BOS, query and separator;
    ids[len(ids) - prompt_length:] is the separator, the prompt and the label token (if any).
    (The instruction recipe, like FlagEmbedding, may cut into the first separator when the query
    nearly fills the budget; the Matryoshka recipe cuts the query instead, so its lengths are exact.)"""

    input_ids: list[int]
    query_length: int
    prompt_length: int


@dataclass
class PairFormatter:
    """Builds `[BOS] A: query \\n B: passage \\n prompt [label]` with SPEC 3 truncation."""

    name: ClassVar[str] = "instruction"
    answer_tokens: ClassVar[int] = 1  # the label token appended after the prompt
    carries_lengths: ClassVar[bool] = False  # items carry query_length / prompt_length (SPEC 4)

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

    @property
    def query_limit(self) -> int:
        """q_ids keep this many tokens: Q + P // 4 (FlagEmbedding lets the query borrow from P)."""
        return query_store_len(self.query_max_len, self.passage_max_len)

    @property
    def passage_limit(self) -> int:
        """p_ids keep this many tokens: P + Q // 2."""
        return passage_store_len(self.query_max_len, self.passage_max_len)

    @property
    def min_second(self) -> int:
        """Tokens of `sep + p_ids` that must fit beside `first` before the query is cut. FlagEmbedding
        cuts nothing while one token fits (so the separator itself may be cut)."""
        return 1

    def prompt_ids(self, prompt: str | None = None) -> list[int]:
        prompt = self.prompt if prompt is None else prompt
        ids = self._prompt_cache.get(prompt)
        if ids is None:
            ids = self._prompt_cache[prompt] = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return ids

    def budget(self, prompt: str | None = None) -> int:
        """Tokens left for `first + second` once the separator, prompt and answer are placed."""
        return self._budget(len(self.prompt_ids(prompt)))

    def _budget(self, n_prompt: int) -> int:
        return self.max_length - (n_prompt + self.answer_tokens) - len(self.sep_ids)

    def check_prompt(self, prompt: str | None = None) -> None:
        """Setup check: even an empty query and passage must fit in Q + P (SPEC 3)."""
        budget = self.budget(prompt)
        needed = len(self.bos_ids) + len(self.sep_ids)
        if budget < needed:
            n_prompt = len(self.prompt_ids(prompt))
            answer = "the answer token, " if self.answer_tokens else ""
            raise FormatConfigError(
                f"query_max_len + passage_max_len = {self.query_max_len} + {self.passage_max_len} = "
                f"{self.max_length} tokens cannot hold the prompt ({n_prompt} tokens), {answer}"
                f"two separators ({len(self.sep_ids)} tokens each) and BOS ({len(self.bos_ids)}): "
                f"raise the lengths to at least {self.max_length - budget + needed} in total or shorten the prompt"
            )

    def query_ids(self, query: str) -> list[int]:
        ids = self.tokenizer(self.query_instruction + query, add_special_tokens=False)["input_ids"]
        return ids[: self.query_limit]

    def passage_ids(self, passage: str) -> list[int]:
        ids = self.tokenizer(self.passage_instruction + passage, add_special_tokens=False)["input_ids"]
        return ids[: self.passage_limit]

    def layout(self, query_ids: list[int], passage_ids: list[int], prompt_ids: list[int],
               label: int | None = None) -> PairLayout:
        """One pair from token ids; longer q_ids / p_ids (e.g. pre-tokenised ones) are cut to this recipe's limits."""
        return PairLayout(*self.layout_group(query_ids, [passage_ids], prompt_ids, [label])[0])

    def layout_group(self, query_ids: list[int], passages: Sequence[list[int]], prompt_ids: list[int],
                     labels: Sequence[int | None] | None = None) -> list[tuple[list[int], int, int]]:
        """One query with each of `passages` (a training group), doing the query's share of the work once:
        `(input_ids, query_length, prompt_length)` per passage, as in `PairLayout` (plain tuples: cheaper)."""
        sep = self.sep_ids
        budget = self._budget(len(prompt_ids))
        query_first = self.bos_ids + query_ids[: self.query_limit]
        query_fits = len(query_first) + self.min_second <= budget
        tail = [*sep, *prompt_ids]
        passage_limit = self.passage_limit
        layouts = []
        for passage_ids, label in zip(passages, labels or [None] * len(passages)):
            first, n_passage = query_first, passage_limit
            if not query_fits:
                # FlagEmbedding emits an over-long sequence here; SPEC 3 cuts the query instead,
                # leaving the passage up to half of the room after BOS and separator.
                n_passage = min(len(passage_ids), passage_limit, (budget - len(self.bos_ids) - len(sep)) // 2)
                first = query_first[: budget - len(sep) - n_passage]
            # second = (sep + p_ids) cut from the right to fit the budget; only the instruction
            # recipe (min_second == 1) can cut into the separator itself
            room = budget - len(first) - len(sep)
            if room >= 0:
                ids = [*first, *sep, *passage_ids[: min(n_passage, room)], *tail]
            else:
                ids = [*first, *sep[:room], *tail]
            if label is not None:
                ids.append(label)
            layouts.append((ids, len(first) + len(sep), len(tail) + (label is not None)))
        return layouts

    def build(self, query_ids: list[int], passage_ids: list[int], prompt: str | None = None,
              label: int | None = None) -> list[int]:
        """Input ids of one pair; `label` (a token id) is appended for training, omitted for scoring."""
        return self.layout(query_ids, passage_ids, self.prompt_ids(prompt), label).input_ids

    def encode_pair(self, query: str, passage: str, prompt: str | None = None,
                    label: int | None = None) -> list[int]:
        return self.build(self.query_ids(query), self.passage_ids(passage), prompt, label)

    @classmethod
    def from_recipe(cls, tokenizer: Any, recipe: dict[str, Any]) -> "PairFormatter":
        """The formatter a `recipe()` describes; the tokenizer must give the recorded Yes/No ids."""
        if recipe.get("recipe", "instruction") != cls.name:
            raise FormatConfigError(f"{cls.__name__} formats the {cls.name!r} recipe, not {recipe.get('recipe')!r}: "
                                    f"use formatter_from_recipe")
        fmt = cls(tokenizer, recipe["query_max_len"], recipe["passage_max_len"], recipe["query_instruction"],
                  recipe["passage_instruction"], recipe["prompt"])
        if (fmt.yes_id, fmt.no_id) != (recipe["yes_token_id"], recipe["no_token_id"]):
            raise FormatConfigError(f"tokenizer's Yes/No ids {fmt.yes_id}/{fmt.no_id} differ from the recipe's "
                                    f"{recipe['yes_token_id']}/{recipe['no_token_id']}")
        return fmt

    def recipe(self) -> dict[str, Any]:
        """The facts an exported model needs to format pairs exactly as in training (SPEC 9)."""
        return {
            "recipe": self.name,
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


@dataclass
class MatryoshkaFormatter(PairFormatter):
    """SPEC 4: `[BOS] A: query \\n B: passage \\n prompt`, q_ids cut to exactly Q, nothing after the prompt.

    `build` also returns where the passage starts (`query_length`) and the length of the tail
    (`prompt_length`): token compression pools only what lies between them.
    """

    name: ClassVar[str] = "matryoshka"
    answer_tokens: ClassVar[int] = 0
    carries_lengths: ClassVar[bool] = True

    prompt: str = MATRYOSHKA_PROMPT

    @property
    def query_limit(self) -> int:
        return self.query_max_len

    @property
    def min_second(self) -> int:
        """The whole separator must fit, so that `query_length` is where the passage starts."""
        return len(self.sep_ids)

    def build(self, query_ids: list[int], passage_ids: list[int],  # type: ignore[override]
              prompt: str | None = None) -> PairLayout:
        """(input ids, query_length, prompt_length) of one pair, scored at its last token."""
        return self.layout(query_ids, passage_ids, self.prompt_ids(prompt))

    def encode_pair(self, query: str, passage: str,  # type: ignore[override]
                    prompt: str | None = None) -> PairLayout:
        return self.build(self.query_ids(query), self.passage_ids(passage), prompt)


FORMATTERS: dict[str, type[PairFormatter]] = {f.name: f for f in (PairFormatter, MatryoshkaFormatter)}


def formatter_from_recipe(tokenizer: Any, recipe: dict[str, Any]) -> PairFormatter:
    """Rebuild either recipe's formatter from its `recipe()` (export, inference)."""
    name = recipe.get("recipe", "instruction")
    if name not in FORMATTERS:
        raise FormatConfigError(f"unknown recipe {name!r}: expected one of {sorted(FORMATTERS)}")
    return FORMATTERS[name].from_recipe(tokenizer, recipe)
