"""The instruction recipe's token layout (SPEC 3), checked against an independent reference.

`flag_reference` below re-implements, from SPEC 3 alone, what FlagEmbedding's LLM-reranker
`TrainDatasetForReranker.__getitem__` produces for one (query, passage) pair, including
`prepare_for_model(..., truncation="only_second")`'s quirk of giving up (and emitting an
over-long sequence) when the second sequence is too short to absorb the overflow. The project
must match it token for token except for the final label token and except where the
reference overflows Q + P, where SPEC 3 asks for the query to be cut instead.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from rerank_lightning.data import (
    DEFAULT_PROMPT,
    DataArguments,
    FormatConfigError,
    PairFormatter,
    TrainDatasetForReranker,
)
from rerank_lightning.data.formatting import pad_token_id

# Copied from SPEC 3, not imported, so a changed default in src/ is caught.
SPEC_DEFAULT_PROMPT = (
    "Given a query A and a passage B, determine whether the passage contains an answer to the "
    "query by providing a prediction of either 'Yes' or 'No'."
)
MISTRAL_YES, MISTRAL_NO = 5592, 1770
FLAG_FILES = (
    "reranker_normal_examples.jsonl",
    "reranker_prompt_based_examples.jsonl",
    "llm_reranker_toy_finetune_data.jsonl",
)
# (Q, P): FlagEmbedding's default, a roomy one, and two small ones where long queries overflow.
SETTINGS = ((32, 128), (64, 256), (16, 48), (8, 40))


def tok_ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def spec_pad_id(tok) -> int:
    """SPEC 3: the tokenizer's own pad token, else unk, else eos."""
    for tid in (tok.pad_token_id, tok.unk_token_id, tok.eos_token_id):
        if tid is not None:
            return tid
    raise AssertionError("no pad candidate")


def prepare_only_second(first: list[int], second: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """`tokenizer.prepare_for_model(first, second, truncation='only_second', max_length=...)`.

    transformers' `truncate_sequences` removes the overflow from the right of the second
    sequence only if that sequence is longer than the overflow; otherwise it logs an error
    and truncates nothing, so the result is longer than `max_length`.
    """
    overflow = len(first) + len(second) - max_length
    if overflow > 0 and len(second) > overflow:
        second = second[:-overflow]
    return first, second


def flag_reference(tok, query: str, passage: str, prompt: str, Q: int, P: int,
                   qi: str = "A: ", pi: str = "B: ") -> list[int]:
    """FlagEmbedding's input ids for one pair: always ends in "Yes" (SPEC 3)."""
    sep = tok_ids(tok, "\n")
    q_ids = tok_ids(tok, qi + query)[: Q + P // 4]
    p_ids = tok_ids(tok, pi + passage)[: P + Q // 2]
    answer = tok_ids(tok, prompt) + tok_ids(tok, "Yes")
    budget = Q + P - len(answer) - len(sep)
    bos = tok.bos_token_id
    first = [bos] + q_ids if bos is not None and bos != spec_pad_id(tok) else q_ids
    first, second = prepare_only_second(first, sep + p_ids, budget)
    return first + second + sep + answer


def check_against_reference(tok, fmt: PairFormatter, query: str, passage: str, prompt: str,
                            label: int, Q: int, P: int) -> bool:
    """Assert SPEC 3 for one pair; returns True when the reference overflowed Q + P."""
    ours = fmt.encode_pair(query, passage, prompt, label)
    ref = flag_reference(tok, query, passage, prompt, Q, P)
    assert ours[-1] == label
    assert ref[-1] == fmt.yes_id
    if len(ref) <= Q + P:
        assert ours[:-1] == ref[:-1], f"layout differs from FlagEmbedding for {query!r} / {passage[:40]!r}"
        return False
    # FlagEmbedding would emit an over-long sequence: the project cuts the query instead.
    assert len(ours) <= Q + P
    assert_cut_layout(tok, ours, query, passage, prompt, label, Q, P)
    return True


def assert_cut_layout(tok, ours: list[int], query: str, passage: str, prompt: str, label: int,
                      Q: int, P: int) -> None:
    """ours == [bos] + q_ids[:a] + sep + p_ids[:b] + sep + tok(prompt) + [label] for some a, b."""
    sep = tok_ids(tok, "\n")
    q_ids = tok_ids(tok, "A: " + query)[: Q + P // 4]
    p_ids = tok_ids(tok, "B: " + passage)[: P + Q // 2]
    bos = tok.bos_token_id
    first = [bos] + q_ids if bos is not None and bos != spec_pad_id(tok) else q_ids
    tail = sep + tok_ids(tok, prompt) + [label]
    assert ours[-len(tail):] == tail
    body = ours[: -len(tail)]
    n_bos = len(first) - len(q_ids)
    for b in range(len(p_ids) + 1):
        a = len(body) - len(sep) - b
        if a >= n_bos and body[:a] == first[:a] and body[a:] == sep + p_ids[:b]:
            return
    raise AssertionError(f"{ours} is not [bos] + a prefix of the query + sep + a prefix of the passage + tail")


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_default_prompt_and_answer_tokens_are_the_specified_ones(mistral_tokenizer):
    """SPEC 3: the default prompt text, and "Yes"/"No" as single tokens of the tokenizer."""
    assert DEFAULT_PROMPT == SPEC_DEFAULT_PROMPT
    fmt = PairFormatter(mistral_tokenizer)
    assert (fmt.query_max_len, fmt.passage_max_len) == (32, 128)
    assert (fmt.query_instruction, fmt.passage_instruction) == ("A: ", "B: ")
    assert (fmt.yes_id, fmt.no_id) == (MISTRAL_YES, MISTRAL_NO)
    assert fmt.sep_ids == tok_ids(mistral_tokenizer, "\n") == [28705, 13]


@pytest.mark.parametrize("Q,P", SETTINGS)
def test_every_real_pair_matches_flagembedding(mistral_tokenizer, shared_data, Q, P):
    """SPEC 3: every (query, passage) pair of FlagEmbedding's own example data is laid out as
    FlagEmbedding lays it out (all tokens before the label), with "Yes" as the positive's label
    and "No" as the negatives'; where FlagEmbedding would exceed Q + P, the project stays within."""
    tok = mistral_tokenizer
    fmt = PairFormatter(tok, query_max_len=Q, passage_max_len=P)
    pairs = overflowed = 0
    for name in FLAG_FILES:
        for rec in read_records(shared_data / "flagembedding" / name):
            prompt = rec.get("prompt", SPEC_DEFAULT_PROMPT)
            for passage in rec["pos"]:
                overflowed += check_against_reference(tok, fmt, rec["query"], passage, prompt, fmt.yes_id, Q, P)
                pairs += 1
            for passage in rec["neg"]:
                overflowed += check_against_reference(tok, fmt, rec["query"], passage, prompt, fmt.no_id, Q, P)
                pairs += 1
    assert pairs == 10 * 26 * 2 + 10 * 8
    if (Q, P) == (8, 40):
        assert 0 < overflowed < pairs, "this setting is meant to exercise both branches"
    if (Q, P) in ((32, 128), (64, 256)):
        assert overflowed == 0


def test_overflow_is_detected_by_the_reference_for_a_long_query(mistral_tokenizer):
    """SPEC 3: the reference itself really does overflow where the project cuts the query, so the
    'project differs' branch above is not vacuous."""
    tok = mistral_tokenizer
    Q, P = 8, 40
    query = "what is the name of the longest river that flows through the capital city of a country"
    ref = flag_reference(tok, query, "a passage", SPEC_DEFAULT_PROMPT, Q, P)
    assert len(ref) > Q + P
    fmt = PairFormatter(tok, query_max_len=Q, passage_max_len=P)
    ours = fmt.encode_pair(query, "a passage", None, fmt.no_id)
    assert len(ours) <= Q + P
    assert_cut_layout(tok, ours, query, "a passage", SPEC_DEFAULT_PROMPT, fmt.no_id, Q, P)


def _matching(tok, options: list[str], ids: list[int], query: str, prompt: str, Q: int, P: int) -> list[int]:
    """Indices of the options whose reference layout equals `ids` (label excluded)."""
    return [k for k, p in enumerate(options)
            if flag_reference(tok, query, p, prompt, Q, P)[:-1] == ids[:-1]]


@pytest.mark.parametrize("name", FLAG_FILES)
def test_dataset_items_are_groups_of_reference_layouts(mistral_tokenizer, shared_data, name):
    """SPEC 2 + 3: `TrainDatasetForReranker[i]` is G encodings, the positive first; each is a
    FlagEmbedding layout of the record's query with one of its passages and its prompt (or the
    default), labelled Yes/No at the last position only; `teacher_score` is present exactly when
    the record has scores and equals the score of that passage."""
    tok = mistral_tokenizer
    Q, P, G = 32, 128, 8
    path = shared_data / "flagembedding" / name
    records = read_records(path)
    ds = TrainDatasetForReranker(DataArguments(train_data=str(path), train_group_size=G,
                                               query_max_len=Q, passage_max_len=P), tok)
    assert len(ds) == len(records)
    sep = tok_ids(tok, "\n")
    for i, rec in enumerate(records):
        prompt = rec.get("prompt", SPEC_DEFAULT_PROMPT)
        tail = sep + tok_ids(tok, prompt)
        has_scores = "pos_scores" in rec
        group = ds[i]
        assert len(group) == G
        for j, enc in enumerate(group):
            ids = enc["input_ids"]
            assert {"input_ids", "attention_mask", "labels"} <= set(enc)
            assert enc["attention_mask"] == [1] * len(ids)
            label = MISTRAL_YES if j == 0 else MISTRAL_NO
            assert ids[-1] == label
            assert enc["labels"] == [-100] * (len(ids) - 1) + [label]
            assert ids[-1 - len(tail):-1] == tail
            assert len(ids) <= Q + P
            options = rec["pos"] if j == 0 else rec["neg"]
            found = _matching(tok, options, ids, rec["query"], prompt, Q, P)
            assert found, f"item {i}, passage {j}: not the layout of any {'pos' if j == 0 else 'neg'} passage"
            assert ("teacher_score" in enc) == has_scores
            if has_scores:
                scores = rec["pos_scores"] if j == 0 else rec["neg_scores"]
                assert enc["teacher_score"] in {scores[k] for k in found}


def test_dataset_uses_record_prompt_else_configured_default(mistral_tokenizer, tmp_path):
    """SPEC 1 + 3: a record's own `prompt` is used for its pairs; a record without one gets the
    configured prompt (DataArguments.prompt, FlagEmbedding's default unless changed)."""
    tok = mistral_tokenizer
    own = "Does passage B answer question A? Say Yes or No."
    path = tmp_path / "train.jsonl"
    path.write_text(
        json.dumps({"query": "capital of France", "pos": ["Paris is the capital."], "neg": ["Rome is nice."],
                    "prompt": own}) + "\n"
        + json.dumps({"query": "largest planet", "pos": ["Jupiter is the largest."], "neg": ["Mars is red."]}) + "\n",
        encoding="utf-8",
    )
    sep = tok_ids(tok, "\n")
    for configured in (SPEC_DEFAULT_PROMPT, "Is B relevant to A?"):
        ds = TrainDatasetForReranker(DataArguments(train_data=str(path), train_group_size=2, prompt=configured), tok)
        for i, prompt in ((0, own), (1, configured)):
            rec = ds.records[i]
            tail = sep + tok_ids(tok, prompt)
            for enc, passage in zip(ds[i], (rec.pos[0], rec.neg[0])):
                assert enc["input_ids"][-1 - len(tail):-1] == tail
                assert enc["input_ids"][:-1] == flag_reference(tok, rec.query, passage, prompt, 32, 128)[:-1]


def test_dataset_rejects_a_record_prompt_too_long_for_the_lengths_at_setup(mistral_tokenizer, tmp_path):
    """SPEC 3: a configuration where even an empty passage cannot fit is an error at setup —
    also when the offending prompt comes from a record."""
    path = tmp_path / "train.jsonl"
    long_prompt = " ".join(["Please decide carefully whether B answers A."] * 10)
    path.write_text(json.dumps({"query": "q", "pos": ["p"], "neg": ["n"], "prompt": long_prompt}) + "\n",
                    encoding="utf-8")
    with pytest.raises(FormatConfigError, match=r"16 \+ 48 = 64"):
        TrainDatasetForReranker(DataArguments(train_data=str(path), train_group_size=2,
                                              query_max_len=16, passage_max_len=48), mistral_tokenizer)


def test_tokenizer_without_bos_starts_with_the_query(mistral_tokenizer):
    """SPEC 3: `first = q_ids` when the tokenizer has no BOS id."""
    tok = copy.deepcopy(mistral_tokenizer)
    tok.bos_token = None
    assert tok.bos_token_id is None
    fmt = PairFormatter(tok)
    query, passage = "who wrote hamlet", "Hamlet was written by Shakespeare."
    ids = fmt.encode_pair(query, passage, None, fmt.yes_id)
    q_ids = tok_ids(tok, "A: " + query)
    assert ids[: len(q_ids) + 2] == q_ids + [28705, 13]
    assert 1 not in ids
    assert ids[:-1] == flag_reference(tok, query, passage, SPEC_DEFAULT_PROMPT, 32, 128)[:-1]
    assert fmt.recipe()["bos_token_id"] is None


def test_tokenizer_whose_bos_is_its_pad_gets_no_bos(mistral_tokenizer):
    """SPEC 3: no BOS when the BOS id equals the pad id."""
    tok = copy.deepcopy(mistral_tokenizer)
    tok.pad_token = tok.bos_token
    assert tok.pad_token_id == tok.bos_token_id == 1
    fmt = PairFormatter(tok)
    assert fmt.pad_id == 1
    query, passage = "who wrote hamlet", "Hamlet was written by Shakespeare."
    ids = fmt.encode_pair(query, passage, None, fmt.no_id)
    q_ids = tok_ids(tok, "A: " + query)
    assert ids[: len(q_ids)] == q_ids
    assert ids[:-1] == flag_reference(tok, query, passage, SPEC_DEFAULT_PROMPT, 32, 128)[:-1]


def test_mistral_tokenizer_gets_bos_first(mistral_tokenizer):
    """SPEC 3: with a BOS id distinct from the pad id, the sequence starts with BOS."""
    fmt = PairFormatter(mistral_tokenizer)
    ids = fmt.encode_pair("who wrote hamlet", "Shakespeare.", None, fmt.yes_id)
    assert ids[0] == 1 and ids.count(1) == 1
    assert ids[1:1 + 3] == tok_ids(mistral_tokenizer, "A: who")[:3]


def test_long_query_is_truncated_to_q_plus_quarter_p(mistral_tokenizer):
    """SPEC 3: q_ids are cut to Q + P // 4 tokens (FlagEmbedding lets the query borrow from P)."""
    tok = mistral_tokenizer
    Q, P = 32, 128
    query = " ".join(f"word{k}" for k in range(120))
    full = tok_ids(tok, "A: " + query)
    assert len(full) > Q + P // 4
    fmt = PairFormatter(tok, query_max_len=Q, passage_max_len=P)
    ids = fmt.encode_pair(query, "short passage", None, fmt.yes_id)
    n = Q + P // 4
    assert ids[1:1 + n] == full[:n]
    assert ids[1 + n:1 + n + 2] == [28705, 13]
    assert ids[:-1] == flag_reference(tok, query, "short passage", SPEC_DEFAULT_PROMPT, Q, P)[:-1]


def test_long_passage_is_cut_to_fill_exactly_q_plus_p(mistral_tokenizer):
    """SPEC 3: p_ids are cut to P + Q // 2, then the passage is cut from the right so the whole
    sequence is exactly Q + P tokens."""
    tok = mistral_tokenizer
    Q, P = 32, 128
    passage = " ".join(f"token{k}" for k in range(400))
    fmt = PairFormatter(tok, query_max_len=Q, passage_max_len=P)
    ids = fmt.encode_pair("short query", passage, None, fmt.no_id)
    assert len(ids) == Q + P
    p_ids = tok_ids(tok, "B: " + passage)
    head = [1] + tok_ids(tok, "A: short query") + [28705, 13]
    tail = [28705, 13] + tok_ids(tok, SPEC_DEFAULT_PROMPT) + [MISTRAL_NO]
    assert ids[: len(head)] == head and ids[-len(tail):] == tail
    kept = ids[len(head): -len(tail)]
    assert kept == p_ids[: len(kept)] and 0 < len(kept) < P + Q // 2
    assert ids[:-1] == flag_reference(tok, "short query", passage, SPEC_DEFAULT_PROMPT, Q, P)[:-1]


def test_long_prompt_with_small_lengths_cuts_the_query_not_the_limit(mistral_tokenizer):
    """SPEC 3: where FlagEmbedding emits an over-long sequence (the query alone fills the budget),
    the project cuts the query and stays within Q + P, keeping BOS, the separators, the prompt
    and the label intact."""
    tok = mistral_tokenizer
    Q, P = 16, 56
    prompt = ("Given a query A and a passage B, decide very carefully whether the passage contains a complete "
              "and correct answer to the query, and reply with a prediction of either 'Yes' or 'No'.")
    query = ("which european river flows through the most countries and capital cities before it finally "
             "reaches the black sea delta on the border of romania and ukraine")
    passage = "The Danube flows through ten countries."
    ref = flag_reference(tok, query, passage, prompt, Q, P)
    assert len(ref) > Q + P, "the reference must overflow here"
    fmt = PairFormatter(tok, query_max_len=Q, passage_max_len=P, prompt=prompt)
    for label in (fmt.yes_id, fmt.no_id):
        ids = fmt.encode_pair(query, passage, None, label)
        assert len(ids) <= Q + P
        assert ids[0] == 1
        assert_cut_layout(tok, ids, query, passage, prompt, label, Q, P)
    # the same through a per-pair prompt on a formatter configured with the default
    fmt2 = PairFormatter(tok, query_max_len=Q, passage_max_len=P)
    assert fmt2.encode_pair(query, passage, prompt, fmt.yes_id) == fmt.encode_pair(query, passage, None, fmt.yes_id)


def test_lengths_too_small_for_the_prompt_fail_at_construction_naming_the_numbers(mistral_tokenizer):
    """SPEC 3: if even an empty query and passage cannot fit, PairFormatter raises at setup, and
    the message names Q, P, Q + P and the prompt length."""
    n_prompt = len(tok_ids(mistral_tokenizer, SPEC_DEFAULT_PROMPT))
    with pytest.raises(FormatConfigError) as err:
        PairFormatter(mistral_tokenizer, query_max_len=8, passage_max_len=8)
    msg = str(err.value)
    assert "8 + 8 = 16" in msg
    assert f"({n_prompt} tokens)" in msg


def test_smallest_workable_lengths_are_accepted_and_respected(mistral_tokenizer):
    """SPEC 3: the setup check is exact: BOS + 2 separators + prompt + label is the minimum
    total; one token less raises; at the minimum every pair is within Q + P."""
    tok = mistral_tokenizer
    n_prompt = len(tok_ids(tok, SPEC_DEFAULT_PROMPT))
    minimum = 1 + 2 + 2 + n_prompt + 1
    with pytest.raises(FormatConfigError):
        PairFormatter(tok, query_max_len=minimum - 1 - 30, passage_max_len=30)
    fmt = PairFormatter(tok, query_max_len=minimum - 30, passage_max_len=30)
    for query, passage in (("q", ""), ("a much longer query with many words", "and a passage too")):
        ids = fmt.encode_pair(query, passage, None, fmt.yes_id)
        assert len(ids) <= minimum
        assert ids[0] == 1 and ids[-1] == fmt.yes_id
        assert ids[-(n_prompt + 3):-1] == [28705, 13] + tok_ids(tok, SPEC_DEFAULT_PROMPT)


def test_random_sweep_never_exceeds_q_plus_p(mistral_tokenizer):
    """SPEC 3: 'the total length never exceeds Q + P', over random lengths, texts and prompts;
    where FlagEmbedding stays within Q + P the layout is identical to it."""
    tok = mistral_tokenizer
    rng = random.Random(1234)
    words = ("river capital ocean the a of photosynthesis 1957 Sputnik électricité naïve co-operate "
             "don't U.S.A. mountain $100 (parenthesis) 東京 emoji🙂 newline\nline tab\tword").split(" ")

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    checked = rejected = overflowed = 0
    for _ in range(300):
        Q, P = rng.randint(2, 64), rng.randint(2, 160)
        prompt = SPEC_DEFAULT_PROMPT if rng.random() < 0.5 else text(rng.randint(1, 40))
        try:
            fmt = PairFormatter(tok, query_max_len=Q, passage_max_len=P, prompt=prompt)
        except FormatConfigError:
            rejected += 1
            continue
        query, passage = text(rng.randint(1, 80)), text(rng.randint(0, 200))
        label = rng.choice((fmt.yes_id, fmt.no_id))
        overflowed += check_against_reference(tok, fmt, query, passage, prompt, label, Q, P)
        checked += 1
    assert checked > 100 and rejected > 0 and overflowed > 0


class CharTokenizer:
    """A minimal tokenizer: one id per character, except for whole words listed in `words`."""

    def __init__(self, words: dict[str, int] = (), bos=1, pad=None, unk=0, eos=2):
        self.words = dict(words)
        self.bos_token_id, self.pad_token_id, self.unk_token_id, self.eos_token_id = bos, pad, unk, eos

    def __call__(self, text: str, add_special_tokens: bool = True):
        if text in self.words:
            return {"input_ids": [self.words[text]]}
        return {"input_ids": [1000 + ord(c) for c in text]}


def test_multi_token_yes_or_no_is_rejected_at_setup():
    """SPEC 3: "Yes" and "No" must each be one token, checked at setup."""
    with pytest.raises(FormatConfigError, match="'Yes'"):
        PairFormatter(CharTokenizer(), query_max_len=100, passage_max_len=300)
    with pytest.raises(FormatConfigError, match="'No'"):
        PairFormatter(CharTokenizer({"Yes": 7}), query_max_len=100, passage_max_len=300)
    fmt = PairFormatter(CharTokenizer({"Yes": 7, "No": 8}), query_max_len=100, passage_max_len=300)
    assert (fmt.yes_id, fmt.no_id) == (7, 8)
    ids = fmt.encode_pair("q", "p", None, fmt.no_id)
    assert ids[0] == 1 and ids[-1] == 8 and len(ids) <= 400


@pytest.mark.parametrize(
    "pad,unk,eos,expected",
    [(5, 0, 2, 5), (0, 3, 2, 0), (None, 3, 2, 3), (None, 0, 2, 0), (None, None, 2, 2)],
)
def test_pad_token_is_own_then_unk_then_eos(pad, unk, eos, expected):
    """SPEC 3: the pad token is the tokenizer's own, else unk, else eos (id 0 counts as present)."""
    tok = SimpleNamespace(pad_token_id=pad, unk_token_id=unk, eos_token_id=eos)
    assert pad_token_id(tok) == expected
    fmt = PairFormatter(CharTokenizer({"Yes": 7, "No": 8}, bos=1, pad=pad, unk=unk, eos=eos), 64, 300)
    assert fmt.pad_id == expected
    assert fmt.recipe()["pad_token_id"] == expected


def test_no_pad_candidate_is_an_error():
    """SPEC 3: with no pad, unk or eos there is nothing to pad with: a clear setup error."""
    with pytest.raises(FormatConfigError, match="pad"):
        pad_token_id(SimpleNamespace(pad_token_id=None, unk_token_id=None, eos_token_id=None))


def test_mistral_pads_with_unk(mistral_tokenizer):
    """SPEC 3: Mistral has no pad token, so it pads with unk (0)."""
    assert mistral_tokenizer.pad_token_id is None
    fmt = PairFormatter(mistral_tokenizer)
    assert fmt.pad_id == 0 == mistral_tokenizer.unk_token_id
