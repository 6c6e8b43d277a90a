"""The export's README.md: what the model is, how it was trained, and how each client loads it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from .clients import SCORE_TEMPLATE_FILE, VLLM_OVERRIDES_FILE


def write_model_card(out_dir: Path, recipe: Mapping[str, Any], card: Mapping[str, Any],
                     st_template: bool, vllm_overrides: Mapping[str, Any] | None) -> None:
    """`card`: optional `base_model`, `train_data`, `metrics` ({name: value}) known at export time."""
    metrics = card.get("metrics") or {}
    metric_lines = [f"| {name} | {value:.4f} |" for name, value in sorted(metrics.items())]
    instructions = {"query_instruction_for_rerank": recipe["query_instruction"],
                    "passage_instruction_for_rerank": recipe["passage_instruction"],
                    "prompt": recipe["prompt"]}
    flag_args = ", ".join(f"{k}={v!r}" for k, v in instructions.items())
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-ranking",
        "tags: [reranker, rerank-lightning]",
        "---",
        f"# Reranker ({recipe['recipe']} recipe)",
        "",
        f"- Base model: {card.get('base_model') or 'not recorded'}",
        f"- Training data: {_data(card.get('train_data'))}",
        f"- Recipe: `{recipe['recipe']}`, query up to {recipe['query_max_len']} tokens, passage up to "
        f"{recipe['passage_max_len']}; full settings in `reranker_config.json`",
        _score_line(recipe),
        "",
        "Each pair is laid out as `[BOS] {query_instruction}{query}\\n{passage_instruction}{passage}\\n{prompt}` with",
        "",
        "```json",
        json.dumps(instructions, indent=2, ensure_ascii=False),
        "```",
        "",
        "## Validation metrics",
        "",
        *(["| metric | value |", "|---|---|", *metric_lines] if metric_lines else ["Not recorded at export time."]),
        "",
        "## Loading",
        "",
        "rerank-lightning (any recipe):",
        "",
        "```python",
        "from rerank_lightning import Reranker",
        "reranker = Reranker.from_pretrained(PATH)",
        "scores = reranker.predict([(query, passage), ...])",
        "ranking = reranker.rank(query, passages, top_k=10)",
        "```",
    ]
    if recipe["recipe"] == "instruction":
        lines += [
            "",
            "FlagEmbedding 1.4.2 (transformers 4.x), same scores in fp32 on pairs neither side truncates:",
            "",
            "```python",
            "from FlagEmbedding import FlagLLMReranker",
            f"reranker = FlagLLMReranker(PATH, use_fp16=False, {flag_args})",
            "scores = reranker.compute_score([[query, passage], ...])",
            "```",
        ]
    if st_template:
        lines += [
            "",
            f"sentence-transformers (>= 5.4): the tokenizer's chat template (`{SCORE_TEMPLATE_FILE}`) is the pair layout",
            "(it replaces the base model's chat template), the score the raw \"Yes\" logit (`LogitScore`, no activation):",
            "",
            "```python",
            "from sentence_transformers import CrossEncoder",
            "model = CrossEncoder(PATH)",
            "scores = model.predict([(query, passage), ...])",
            "```",
        ]
    if vllm_overrides:
        lines += [
            "",
            f"vLLM score API (unverified: written for vLLM's causal-LM-as-classifier loading, not run here): "
            f"the chat template `{SCORE_TEMPLATE_FILE}` lays out the pair, `{VLLM_OVERRIDES_FILE}` turns the LM head into the \"Yes\" "
            f"logit. Ask for raw scores (no sigmoid) with `use_activation: false` where your vLLM version has it.",
            "",
            "```bash",
            f"vllm serve PATH --runner pooling --chat-template PATH/{SCORE_TEMPLATE_FILE} \\",
            f"  --hf-overrides '{json.dumps(dict(vllm_overrides))}'",
            "```",
        ]
    lines += [
        "",
        "transformers (4.x or 5): `AutoModelForCausalLM.from_pretrained(PATH)` and `AutoTokenizer.from_pretrained(PATH)`"
        " (left padding, pad token saved); score = next-token logit of \"Yes\" at the last token.",
        "",
    ]
    (out_dir / "README.md").write_text("\n".join(lines))


def _score_line(recipe: Mapping[str, Any]) -> str:
    if recipe["recipe"] == "matryoshka":
        return ("- Score: layer-wise heads at any exit layer, with optional passage compression (Matryoshka); "
                "scored by rerank-lightning only, the weights load in transformers as a plain causal LM.")
    return (f"- Score: the logit of the token \"Yes\" (id {recipe['yes_token_id']}) after the prompt; higher is more "
            f"relevant; no sigmoid.")


def _data(train_data: Any) -> str:
    if not train_data:
        return "not recorded"
    return ", ".join(map(str, train_data)) if isinstance(train_data, (list, tuple)) else str(train_data)
