"""Scoring an export as a library user does: a light import, CrossEncoder-style `predict` / `rank`, and an
export directory that other clients read the way the project does (tests/test_interop.py runs those clients)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from rerank_lightning.data.formatting import PairFormatter
from rerank_lightning.inference import Reranker, export_reranker
from rerank_lightning.inference.clients import template_ids
from rerank_lightning.model import load_causal_lm

PAIRS = [("what is the capital of peru?", "Lima is the capital of Peru."),
         ("what is the capital of peru?", "Santiago is the capital of Chile."),
         ("who wrote dracula", "Bram Stoker wrote Dracula in 1897.")]


@pytest.fixture(scope="module")
def export(tmp_path_factory, mistral_tokenizer):
    from conftest import TINY_MODEL

    init = {**TINY_MODEL["random_init"], "rope_theta": 5e5}
    lm = load_causal_lm({"random_init": init, "dtype": "float32"}, vocab_size=len(mistral_tokenizer))
    formatter = PairFormatter(mistral_tokenizer)
    out = export_reranker(lm, formatter, tmp_path_factory.mktemp("export"),
                          card={"base_model": "tiny-random-llama", "train_data": ["data/sample/train.jsonl"],
                                "metrics": {"val/nDCG@10": 0.4321}})
    return out, formatter


def test_import_scores_without_lightning_hydra_or_datasets():
    code = ("import sys, rerank_lightning.inference\n"
            "print([m for m in ('lightning', 'hydra', 'datasets', 'omegaconf') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""})
    assert done.stdout.strip() == "[]"


def test_model_does_not_import_inference():
    """Arrows point down: model code never imports the inference package (no model <-> inference cycle)."""
    for path in (ROOT / "src" / "rerank_lightning" / "model").glob("*.py"):
        assert "inference" not in "".join(line for line in path.read_text().splitlines(True)
                                         if line.lstrip().startswith(("from ", "import "))), path.name


def test_predict_and_rank_read_like_a_cross_encoder(export):
    reranker = Reranker.from_pretrained(export[0], batch_size=2)
    assert str(next(reranker.lm.parameters()).device) == "cpu"  # chosen automatically: no CUDA here
    scores = reranker.predict(PAIRS, batch_size=2, show_progress_bar=False)
    assert isinstance(scores, np.ndarray) and scores.shape == (3,)
    assert scores.tolist() == pytest.approx(reranker.score(PAIRS), abs=1e-6)

    passages = [p for _, p in PAIRS]
    ranked = reranker.rank(PAIRS[0][0], passages, return_documents=True)
    expected = reranker.predict([(PAIRS[0][0], p) for p in passages])
    assert [r["corpus_id"] for r in ranked] == np.argsort(-expected, kind="stable").tolist()
    assert [r["text"] for r in ranked] == [passages[r["corpus_id"]] for r in ranked]
    assert [r["score"] for r in ranked] == pytest.approx(sorted(expected, reverse=True), abs=1e-6)
    top = reranker.rank(PAIRS[0][0], passages, top_k=1)
    assert top == [{"corpus_id": ranked[0]["corpus_id"], "score": ranked[0]["score"]}]
    assert reranker.rerank(PAIRS[0][0], passages) == [(r["corpus_id"], r["score"]) for r in ranked]


def test_dtype_option_loads_the_weights_in_that_dtype(export):
    import torch

    assert next(Reranker.from_pretrained(export[0], dtype="float64").lm.parameters()).dtype == torch.float64


def test_export_configs_read_the_same_in_transformers_4(export):
    """transformers 5 writes rope settings, tokenizer class and special tokens that 4.x cannot read or reads
    differently (rope theta 1e4 instead of the model's); the export states them the 4.x way too."""
    out, _ = export
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 5e5
    tok = json.loads((out / "tokenizer_config.json").read_text())
    assert tok["tokenizer_class"] != "TokenizersBackend"
    assert not isinstance(tok.get("extra_special_tokens"), list)
    assert tok["padding_side"] == "left" and tok["pad_token"] == "<unk>"


def test_export_carries_the_sentence_transformers_and_vllm_files(export):
    out, formatter = export
    modules = json.loads((out / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "LogitScore"]
    assert json.loads((out / "1_LogitScore" / "config.json").read_text())["true_token_id"] == formatter.yes_id
    assert json.loads((out / "config_sentence_transformers.json").read_text())["activation_fn"].endswith("Identity")
    overrides = json.loads((out / "vllm_hf_overrides.json").read_text())
    assert overrides["classifier_from_token"] == [formatter.tokenizer.convert_ids_to_tokens(formatter.yes_id)]
    template = (out / "chat_template.jinja").read_text()
    for query, passage in PAIRS:  # the chat template tokenizes into the ids the project scores
        assert template_ids(formatter.tokenizer, template, query, passage) == formatter.encode_pair(query, passage)


def test_export_has_a_model_card(export):
    card = (export[0] / "README.md").read_text()
    for fact in ("tiny-random-llama", "data/sample/train.jsonl", "val/nDCG@10 | 0.4321", "FlagLLMReranker",
                 "CrossEncoder", "vllm serve", "unverified", "Given a query A and a passage B"):
        assert fact in card
