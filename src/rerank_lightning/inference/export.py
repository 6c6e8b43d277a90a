"""Export (SPEC 9): a Hugging Face directory with merged weights, tokenizer and the recipe."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..data.formatting import PairFormatter, ensure_pad_token

log = logging.getLogger(__name__)
RECIPE_FILE = "reranker_config.json"
FORMAT_VERSION = 1


def export_reranker(lm: torch.nn.Module, formatter: PairFormatter, out_dir: str | Path) -> Path:
    """Write `lm` (LoRA merged into the base) plus tokenizer and recipe to `out_dir`.

    A peft model is merged in place (`merge_and_unload`), so export last. Weights are saved in
    the dtype they were trained in.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if hasattr(lm, "merge_and_unload"):
        lm = lm.merge_and_unload()
    lm.config.use_cache = True
    lm.save_pretrained(out_dir)
    tokenizer = ensure_pad_token(formatter.tokenizer)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(out_dir)
    tokenizer.padding_side = padding_side
    recipe: dict[str, Any] = {"format_version": FORMAT_VERSION, "score": "yes_logit", **formatter.recipe()}
    (out_dir / RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n")
    log.info("exported reranker to %s", out_dir)
    return out_dir
