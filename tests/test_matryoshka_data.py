"""The Matryoshka recipe's data (SPEC 4, 5): layout, lengths, dataset items, collation, candidate
batches and the data=matryoshka config.

`matryoshka_reference` re-implements by hand, from FlagEmbedding's
research/Matroyshka_reranker/finetune/self_distillation/data.py, how one pair is built there:
the query cut to exactly Q, `prepare_for_model([bos] + q, sep + p, truncation='only_second',
max_length=Q + P - len(prompt) - len(sep))` (which gives up, leaving the sequence over-long, when
`sep + p` is too short to absorb the overflow), then `sep + prompt` and nothing else.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import ROOT
from rerank_lightning.data import (
    CandidatePairs,
    FormatConfigError,
    MatryoshkaFormatter,
    PairFormatter,
    RerankDataModule,
    formatter_from_recipe,
    load_candidate_lists,
    sample_group,
)
from rerank_lightning.data import matryoshka
from rerank_lightning.data.candidates import collate_candidates
from rerank_lightning.data.instruction import RerankCollator as PairCollator

# From SPEC 4, not imported, so a changed default in src/ is caught.
SPEC_PROMPT = "Predict whether passage B contains an answer to query A."
SEP = [28705, 13]  # Mistral's tok("\n")
FLAG_FILES = (
    "reranker_normal_examples.jsonl",
    "reranker_prompt_based_examples.jsonl",
    "llm_reranker_toy_finetune_data.jsonl",
)
# (Q, P): the Matryoshka scripts' setting, a shorter one, and one where records' own 32-token
# prompts leave no room for long queries (the reference overflows, the project cuts the query).
SETTINGS = ((32, 192), (32, 64), (16, 32))


def tok_ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def matryoshka_reference(tok, query: str, passage: str, prompt: str, Q: int, P: int) -> tuple[list[int], int, int]:
    """(input_ids, query_length, prompt_length) as FlagEmbedding's Matryoshka dataset builds them."""
    sep = tok_ids(tok, "\n")
    q_ids = tok_ids(tok, "A: " + query)[:Q]
    p_ids = tok_ids(tok, "B: " + passage)[: P + Q // 2]
    prompt_ids = tok_ids(tok, prompt)
    max_length = Q + P - len(prompt_ids) - len(sep)
    first, second = [tok.bos_token_id] + q_ids, sep + p_ids  # Mistral: BOS 1, no pad token
    overflow = len(first) + len(second) - max_length
    if overflow > 0 and len(second) > overflow:  # truncation='only_second' gives up otherwise
        second = second[:-overflow]
    return first + second + sep + prompt_ids, len(first + sep), len(sep + prompt_ids)


def assert_cut_layout(tok, layout, query: str, passage: str, prompt: str, Q: int, P: int) -> None:
    """SPEC 3's rule where the reference overflows: [bos] + q[:a] + sep + p[:b] + sep + prompt,
    within Q + P, the lengths marking the passage."""
    ids, query_length, prompt_length = layout
    q_ids = tok_ids(tok, "A: " + query)[:Q]
    p_ids = tok_ids(tok, "B: " + passage)[: P + Q // 2]
    tail = SEP + tok_ids(tok, prompt)
    assert len(ids) <= Q + P
    assert prompt_length == len(tail) and ids[len(ids) - prompt_length:] == tail
    a = query_length - 1 - len(SEP)
    assert 0 <= a < len(q_ids)
    assert ids[:query_length] == [1] + q_ids[:a] + SEP
    b = len(ids) - query_length - prompt_length
    assert ids[query_length: query_length + b] == p_ids[:b]


def read_records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def check_pair(tok, fmt, query, passage, prompt, Q, P) -> bool:
    """Ours equals the reference where it stays within Q + P with a whole separator; True when the
    reference overflowed (and ours cut the query instead)."""
    ours = fmt.encode_pair(query, passage, prompt)
    ref = matryoshka_reference(tok, query, passage, prompt, Q, P)
    ids, query_length, prompt_length = ref
    whole_separator = len(ids) - prompt_length >= query_length  # else the reference cut into it
    if len(ids) <= Q + P and whole_separator:
        assert ours == ref, f"differs from FlagEmbedding for {query!r} / {passage[:40]!r}"
        return False
    assert_cut_layout(tok, ours, query, passage, prompt, Q, P)
    return True


def test_layout_token_by_token_on_a_real_record(mistral_tokenizer, shared_data):
    """SPEC 4: [BOS] + tok("A: " + q)[:Q] + sep + tok("B: " + p) (cut to fit) + sep + tok(prompt),
    nothing after the prompt; query_length is where the passage starts, prompt_length the tail."""
    tok = mistral_tokenizer
    rec = read_records(shared_data / "flagembedding" / "reranker_normal_examples.jsonl")[0]
    fmt = MatryoshkaFormatter(tok, query_max_len=32, passage_max_len=192)
    assert fmt.prompt == SPEC_PROMPT
    prompt_ids = tok_ids(tok, SPEC_PROMPT)
    q_ids, p_ids = tok_ids(tok, "A: " + rec["query"]), tok_ids(tok, "B: " + rec["pos"][0])
    assert len(q_ids) < 32 and len(p_ids) < 192 - len(prompt_ids) - 4  # nothing is cut here
    ids, query_length, prompt_length = fmt.encode_pair(rec["query"], rec["pos"][0])
    assert ids == [1] + q_ids + SEP + p_ids + SEP + prompt_ids
    assert query_length == 1 + len(q_ids) + 2 and prompt_length == 2 + len(prompt_ids)
    assert ids[query_length: len(ids) - prompt_length] == p_ids
    assert ids[-1] == prompt_ids[-1] and fmt.yes_id not in ids[-1:]


def test_query_is_cut_to_exactly_q_and_the_total_to_q_plus_p(mistral_tokenizer):
    """SPEC 4: q_ids keep exactly Q tokens (the instruction recipe would keep Q + P // 4); a long
    passage fills the sequence to exactly Q + P."""
    tok = mistral_tokenizer
    Q, P = 8, 64
    query = ("which european river flows through the most countries and capital cities before it reaches "
             "the black sea delta on the border of romania and ukraine")
    passage = " ".join(f"word{k}" for k in range(200))
    fmt = MatryoshkaFormatter(tok, query_max_len=Q, passage_max_len=P)
    ids, query_length, prompt_length = fmt.encode_pair(query, passage)
    q_ids = tok_ids(tok, "A: " + query)
    assert len(q_ids) > Q + P // 4
    assert ids[:query_length] == [1] + q_ids[:Q] + SEP and query_length == 1 + Q + 2
    assert len(ids) == Q + P
    assert ids[query_length: len(ids) - prompt_length] == tok_ids(tok, "B: " + passage)[: len(ids) - query_length - prompt_length]
    assert ids[len(ids) - prompt_length:] == SEP + tok_ids(tok, SPEC_PROMPT)
    assert (ids, query_length, prompt_length) == matryoshka_reference(tok, query, passage, SPEC_PROMPT, Q, P)
    instruction = PairFormatter(tok, query_max_len=Q, passage_max_len=P)
    assert instruction.query_ids(query) == q_ids[: Q + P // 4] != fmt.query_ids(query)


@pytest.mark.parametrize("Q,P", SETTINGS)
def test_every_flagembedding_pair_matches_the_reference(mistral_tokenizer, shared_data, Q, P):
    """SPEC 4: every (query, passage, prompt) of FlagEmbedding's examples is laid out as the
    Matryoshka reference lays it out, lengths included; where the reference overflows Q + P the
    project cuts the query instead."""
    tok = mistral_tokenizer
    fmt = MatryoshkaFormatter(tok, query_max_len=Q, passage_max_len=P)
    pairs = overflowed = 0
    for name in FLAG_FILES:
        for rec in read_records(shared_data / "flagembedding" / name):
            prompt = rec.get("prompt", SPEC_PROMPT)
            for passage in rec["pos"] + rec["neg"]:
                overflowed += check_pair(tok, fmt, rec["query"], passage, prompt, Q, P)
                pairs += 1
    assert pairs == 10 * 26 * 2 + 10 * 8
    if (Q, P) == (16, 32):
        assert 0 < overflowed < pairs, "this setting is meant to exercise both branches"
    else:
        assert overflowed == 0


@pytest.mark.parametrize("Q,P", SETTINGS[:2])
def test_wikiqa_dataset_items_match_the_reference(mistral_tokenizer, shared_data, tmp_path, Q, P):
    """Dataset items (pre-tokenised, sampled by `sample_group`) on 200 WikiQA records equal the
    reference's construction of the same group, positive first; no scores -> NaN teacher scores."""
    tok = mistral_tokenizer
    G = 16
    args = matryoshka.DataArguments(train_data=str(shared_data / "wikiqa" / "train_flag.jsonl"),
                                    train_group_size=G, query_max_len=Q, passage_max_len=P,
                                    max_example_num_per_dataset=200, cache_dir=str(tmp_path))
    ds = matryoshka.TrainDatasetForReranker(args, tok)
    assert len(ds) == 200
    for i, rec in enumerate(ds.records):
        encodings, query_lengths, prompt_lengths, scores = ds[(2, i)]
        group = sample_group(rec, G, args.seed, 2, i)
        assert len(encodings) == len(query_lengths) == len(prompt_lengths) == len(scores) == G
        assert all(math.isnan(s) for s in scores)
        for j, passage in enumerate(group.passages):
            ref = matryoshka_reference(tok, rec.query, passage, SPEC_PROMPT, Q, P)
            assert (encodings[j]["input_ids"], query_lengths[j], prompt_lengths[j]) == ref, f"record {i}, passage {j}"
            assert encodings[j]["attention_mask"] == [1] * len(ref[0])
            assert set(encodings[j]) == {"input_ids", "attention_mask"}


@pytest.mark.parametrize("name", FLAG_FILES)
def test_flagembedding_dataset_items_and_teacher_scores(mistral_tokenizer, shared_data, tmp_path, name):
    """Items follow the reference layout with the record's own prompt; teacher scores follow their
    passages (SPEC 2) and are NaN where the record has none (FlagEmbedding would put 1)."""
    tok = mistral_tokenizer
    Q, P, G = 32, 192, 16
    path = shared_data / "flagembedding" / name
    raw = read_records(path)
    ds = matryoshka.TrainDatasetForReranker(
        matryoshka.DataArguments(train_data=str(path), train_group_size=G, query_max_len=Q, passage_max_len=P,
                                 cache_dir=str(tmp_path)), tok)
    for i, rec in enumerate(ds.records):
        encodings, query_lengths, prompt_lengths, scores = ds[(0, i)]
        group = sample_group(rec, G, 42, 0, i)
        prompt = raw[i].get("prompt", SPEC_PROMPT)
        for j, passage in enumerate(group.passages):
            ref = matryoshka_reference(tok, rec.query, passage, prompt, Q, P)
            assert (encodings[j]["input_ids"], query_lengths[j], prompt_lengths[j]) == ref
        if "pos_scores" in raw[i]:
            assert scores == list(group.teacher_scores)
            assert scores[0] in raw[i]["pos_scores"] and all(s in raw[i]["neg_scores"] for s in scores[1:])
        else:
            assert len(scores) == G and all(math.isnan(s) for s in scores)


def test_collator_right_pads_and_carries_lengths_and_scores(mistral_tokenizer, shared_data, tmp_path):
    """SPEC 5: {"pair": {input_ids, attention_mask}, "query_lengths" [B*G], "prompt_lengths" [B*G],
    "teacher_scores" [B, G], "group_size"}; rows query-major, right-padded to a multiple of 8."""
    tok = mistral_tokenizer
    G = 4
    fe = shared_data / "flagembedding"
    scored = matryoshka.TrainDatasetForReranker(matryoshka.DataArguments(
        train_data=str(fe / "reranker_normal_examples.jsonl"), train_group_size=G, cache_dir=str(tmp_path)), tok)
    unscored = matryoshka.TrainDatasetForReranker(matryoshka.DataArguments(
        train_data=str(fe / "llm_reranker_toy_finetune_data.jsonl"), train_group_size=G, cache_dir=str(tmp_path)), tok)
    features = [scored[(0, 3)], unscored[(0, 1)], scored[(0, 7)]]
    collator = matryoshka.RerankCollator(tokenizer=tok, query_max_len=32, passage_max_len=128)
    assert collator.padding_side == "right" and collator.pad_to_multiple_of == 8
    batch = collator(features)
    assert set(batch) == {"pair", "query_lengths", "prompt_lengths", "teacher_scores", "group_size"}
    assert set(batch["pair"]) == {"input_ids", "attention_mask"}
    assert batch["group_size"] == G
    ids, mask = batch["pair"]["input_ids"], batch["pair"]["attention_mask"]
    longest = max(len(e["input_ids"]) for f in features for e in f[0])
    assert ids.shape == mask.shape == (3 * G, math.ceil(longest / 8) * 8)
    assert batch["query_lengths"].dtype == batch["prompt_lengths"].dtype == torch.long
    assert batch["query_lengths"].shape == batch["prompt_lengths"].shape == (3 * G,)
    assert batch["teacher_scores"].dtype == torch.float32 and batch["teacher_scores"].shape == (3, G)
    for b, (encodings, query_lengths, prompt_lengths, scores) in enumerate(features):
        for j, enc in enumerate(encodings):
            row, n = b * G + j, len(enc["input_ids"])
            assert ids[row, :n].tolist() == enc["input_ids"]  # right padding
            assert (ids[row, n:] == 0).all() and mask[row].tolist() == [1] * n + [0] * (ids.shape[1] - n)
            assert batch["query_lengths"][row] == query_lengths[j]
            assert batch["prompt_lengths"][row] == prompt_lengths[j]
            # the passage lies between the two lengths, the prompt ends at the last real token
            assert ids[row, n - prompt_lengths[j]: n].tolist()[:2] == SEP
    assert torch.equal(batch["teacher_scores"][[0, 2]], torch.tensor([features[0][3], features[2][3]]))
    assert torch.isnan(batch["teacher_scores"][1]).all()
    # a short last batch keeps its real size
    assert collator([features[0]])["teacher_scores"].shape == (1, G)


def test_candidate_batches_carry_lengths_with_the_matryoshka_formatter(mistral_tokenizer, shared_data):
    """Validation / inference on candidate lists: each pair carries query_length and prompt_length,
    collated into tensors, right-padded; the instruction formatter's batches do not carry them."""
    tok = mistral_tokenizer
    lists = load_candidate_lists(shared_data / "wikiqa" / "dev_rerank_candidates.jsonl", max_queries=3)
    fmt = MatryoshkaFormatter(tok, query_max_len=32, passage_max_len=192)
    pairs = CandidatePairs(lists, fmt)
    items = [pairs[i] for i in range(6)]
    for item in items:
        cl = lists[item["query_index"]]
        expected = fmt.encode_pair(cl.query, cl.texts[item["candidate_index"]])
        assert (item["input_ids"], item["query_length"], item["prompt_length"]) == expected
    batch = collate_candidates(items, PairCollator(tok, padding_side="right"))
    assert batch["query_lengths"].tolist() == [it["query_length"] for it in items]
    assert batch["prompt_lengths"].tolist() == [it["prompt_length"] for it in items]
    for row, item in enumerate(items):
        assert batch["pair"]["input_ids"][row, : len(item["input_ids"])].tolist() == item["input_ids"]
    plain = CandidatePairs(lists, PairFormatter(tok))
    assert "query_length" not in plain[0]
    assert "query_lengths" not in collate_candidates([plain[0], plain[1]], PairCollator(tok))


def test_recipes_round_trip_through_formatter_from_recipe(mistral_tokenizer):
    tok = mistral_tokenizer
    mat = MatryoshkaFormatter(tok, query_max_len=16, passage_max_len=96, prompt="Does B answer A?")
    recipe = mat.recipe()
    assert recipe["recipe"] == "matryoshka" and recipe["prompt"] == "Does B answer A?"
    rebuilt = formatter_from_recipe(tok, recipe)
    assert type(rebuilt) is MatryoshkaFormatter and rebuilt.recipe() == recipe
    assert rebuilt.encode_pair("q", "p") == mat.encode_pair("q", "p")
    inst = PairFormatter(tok)
    assert inst.recipe()["recipe"] == "instruction"
    assert type(formatter_from_recipe(tok, inst.recipe())) is PairFormatter
    assert PairFormatter.from_recipe(tok, inst.recipe()).recipe() == inst.recipe()
    with pytest.raises(FormatConfigError, match="formatter_from_recipe"):
        PairFormatter.from_recipe(tok, recipe)
    with pytest.raises(FormatConfigError, match="unknown recipe 'other'"):
        formatter_from_recipe(tok, {**recipe, "recipe": "other"})


def test_matryoshka_lengths_too_small_fail_at_setup(mistral_tokenizer):
    """SPEC 3/4: no room for BOS, two separators and the prompt is a setup error naming the numbers."""
    n_prompt = len(tok_ids(mistral_tokenizer, SPEC_PROMPT))
    with pytest.raises(FormatConfigError, match=rf"4 \+ 8 = 12 tokens cannot hold the prompt \({n_prompt} tokens\)"):
        MatryoshkaFormatter(mistral_tokenizer, query_max_len=4, passage_max_len=8)
    fmt = MatryoshkaFormatter(mistral_tokenizer, query_max_len=4, passage_max_len=n_prompt + 1)
    ids, query_length, prompt_length = fmt.encode_pair("a long query about rivers", "a passage")
    assert len(ids) <= 4 + n_prompt + 1 and ids[query_length - 2: query_length] == SEP


def test_datamodule_matryoshka_recipe(mistral_tokenizer, shared_data, tmp_path):
    """recipe=matryoshka picks the Matryoshka formatter, dataset and collator (right padding by
    default); validation batches carry the lengths; an unknown recipe is an error."""
    tok = mistral_tokenizer
    dm = RerankDataModule(tok, train_data=str(shared_data / "flagembedding" / "reranker_normal_examples.jsonl"),
                          val_data=str(shared_data / "wikiqa" / "dev_rerank_candidates.jsonl"), max_val_queries=2,
                          recipe="matryoshka", train_group_size=4, batch_size=2, cache_dir=str(tmp_path))
    assert isinstance(dm.formatter, MatryoshkaFormatter) and dm.formatter.prompt == SPEC_PROMPT
    assert (dm.formatter.yes_id, dm.formatter.no_id) == (5592, 1770)
    dm.setup("fit")
    assert isinstance(dm.train_set, matryoshka.TrainDatasetForReranker)
    batch = next(iter(dm.train_dataloader()))
    assert batch["pair"]["input_ids"].shape[0] == 8 and batch["teacher_scores"].shape == (2, 4)
    assert (batch["pair"]["attention_mask"][:, 0] == 1).all()  # right padding
    val = next(iter(dm.val_dataloader()))
    assert {"query_lengths", "prompt_lengths", "query_index"} <= set(val)
    assert (val["pair"]["attention_mask"][:, 0] == 1).all()
    inst = RerankDataModule(tok, train_data=str(shared_data / "flagembedding" / "reranker_normal_examples.jsonl"),
                            cache_dir=None)
    assert type(inst.formatter) is PairFormatter and inst.collator.padding_side == "left"
    with pytest.raises(ValueError, match="data.recipe must be one of"):
        RerankDataModule(tok, train_data="x.jsonl", recipe="matroyshka")


def test_matryoshka_config_composes_with_the_reference_defaults(mistral_tokenizer, shared_data, tmp_path):
    """conf/data/matryoshka.yaml: G=16, Q=32, P=192, right padding, the recipe's prompt."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf" / "data"), version_base="1.3"):
        cfg = compose("matryoshka", overrides=[
            f"train_data={shared_data / 'flagembedding' / 'reranker_normal_examples.jsonl'}",
            "seed=42", f"cache_dir={tmp_path}"])
    GlobalHydra.instance().clear()
    data = OmegaConf.to_container(cfg, resolve=True)
    assert data["recipe"] == "matryoshka" and data["padding_side"] == "right" and data["prompt"] is None
    assert (data["train_group_size"], data["query_max_len"], data["passage_max_len"]) == (16, 32, 192)
    dm = instantiate(cfg, tokenizer=mistral_tokenizer, _convert_="all")
    assert isinstance(dm.formatter, MatryoshkaFormatter) and dm.formatter.prompt == SPEC_PROMPT
    assert dm.collator.padding_side == "right" and dm.pair_collator.padding_side == "right"
