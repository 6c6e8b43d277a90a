"""Token ids equal FlagEmbedding's, whose tokenizer is sentencepiece (`use_fast=False`).

The reference below builds each pair's ids from SPEC 3 with `sentencepiece` itself, not through
transformers, so a tokenizer that merges runs of spaces differently (transformers 5's converted
`LlamaTokenizer`: `a  b` -> `▁a ▁▁ b`, sentencepiece: `▁a ▁ ▁b`) is caught.
"""

from __future__ import annotations

import json

import pytest
import sentencepiece

from conftest import TINY_MODEL
from rerank_lightning.data import DEFAULT_PROMPT, PairFormatter
from rerank_lightning.model import load_tokenizer
from rerank_lightning.model.backbone import auto_tokenizer, package_dir

FLAG_FILES = (
    "reranker_normal_examples.jsonl",
    "reranker_prompt_based_examples.jsonl",
    "llm_reranker_toy_finetune_data.jsonl",
)
Q, P = 32, 128


@pytest.fixture(scope="module")
def spm() -> sentencepiece.SentencePieceProcessor:
    pkg, _, rel = TINY_MODEL["tokenizer"]["sentencepiece"].partition(":")
    return sentencepiece.SentencePieceProcessor(model_file=str(package_dir(pkg) / rel))


def spec3_reference(sp: sentencepiece.SentencePieceProcessor, query: str, passage: str, prompt: str,
                    positive: bool) -> list[int]:
    """SPEC 3 with tok = sentencepiece's encode; Mistral has BOS 1 and no pad (pad = unk 0 != BOS)."""
    sep = sp.encode("\n")
    q_ids = sp.encode("A: " + query)[: Q + P // 4]
    p_ids = sp.encode("B: " + passage)[: P + Q // 2]
    label = sp.piece_to_id("▁Yes" if positive else "▁No")
    answer = sp.encode(prompt) + sp.encode("Yes")
    budget = Q + P - len(answer) - len(sep)
    first = [sp.bos_id()] + q_ids
    assert len(first) < budget, "query overflows: SPEC 3's cut-the-query case is tested in test_formatting"
    second = (sep + p_ids)[: budget - len(first)]
    return first + second + sep + sp.encode(prompt) + [label]


def test_pair_ids_equal_sentencepiece_on_flagembedding_examples(shared_data, mistral_tokenizer, spm):
    formatter = PairFormatter(mistral_tokenizer, Q, P)
    assert (formatter.yes_id, formatter.no_id) == (spm.piece_to_id("▁Yes"), spm.piece_to_id("▁No"))
    checked = double_spaced = 0
    for name in FLAG_FILES:
        for line in (shared_data / "flagembedding" / name).read_text().splitlines():
            record = json.loads(line)
            prompt = record.get("prompt") or DEFAULT_PROMPT
            for passage, positive in [(p, True) for p in record["pos"]] + [(p, False) for p in record["neg"]]:
                label = formatter.yes_id if positive else formatter.no_id
                ours = formatter.encode_pair(record["query"], passage, record.get("prompt"), label)
                assert ours == spec3_reference(spm, record["query"], passage, prompt, positive), (name, passage[:80])
                checked += 1
                double_spaced += "  " in record["query"] + passage
    assert (checked, double_spaced) == (600, 60)


@pytest.mark.parametrize("text", ["a  b", "A: what happens  to light", " leading space", "x   y\n\n z", "tab\t end "])
def test_texts_encode_as_sentencepiece(mistral_tokenizer, spm, text):
    assert mistral_tokenizer(text, add_special_tokens=False)["input_ids"] == spm.encode(text)
    assert mistral_tokenizer(text)["input_ids"] == [spm.bos_id(), *spm.encode(text)]  # adds BOS, as Llama's does


def test_fast_tokenizer_is_a_documented_opt_out(tiny_model_cfg, spm):
    tiny_model_cfg["sentencepiece_exact"] = False
    fast = load_tokenizer(tiny_model_cfg)
    assert fast("a  b", add_special_tokens=False)["input_ids"] != spm.encode("a  b")
    assert fast("a b", add_special_tokens=False)["input_ids"] == spm.encode("a b")


def test_saved_tokenizer_reloads_exact_and_as_a_llama_tokenizer(mistral_tokenizer, spm, tmp_path):
    mistral_tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    # transformers 4 (FlagEmbedding's) loads this class name; with use_fast=False it is sentencepiece too
    assert config["tokenizer_class"] == "LlamaTokenizer" and config["add_bos_token"] is True
    assert (tmp_path / "tokenizer.model").is_file()
    reloaded = auto_tokenizer(str(tmp_path))
    assert reloaded("a  b", add_special_tokens=False)["input_ids"] == spm.encode("a  b")
    assert reloaded.bos_token_id == spm.bos_id() and len(reloaded) == len(mistral_tokenizer)
