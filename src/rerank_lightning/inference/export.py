"""Export (SPEC 9): a Hugging Face directory with merged weights, tokenizer and the recipe.

From a Lightning checkpoint: `python -m rerank_lightning.inference.export CHECKPOINT OUT_DIR`.
"""

from __future__ import annotations

import argparse
import copy
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
        lm = lm.merge_and_unload(progressbar=True)
    lm.config.use_cache = True
    lm.save_pretrained(out_dir)
    tokenizer = ensure_pad_token(copy.deepcopy(formatter.tokenizer))  # the caller's tokenizer stays as it was
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(out_dir)
    recipe: dict[str, Any] = {"format_version": FORMAT_VERSION, "score": "yes_logit", **formatter.recipe()}
    (out_dir / RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n")
    log.info("exported reranker to %s", out_dir)
    return out_dir


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Export a `RerankerModule` checkpoint written by train.py (its hyperparameters hold model and recipe)."""
    from ..model import RerankerModule, load_tokenizer

    module = RerankerModule.load_from_checkpoint(checkpoint, map_location="cpu")
    recipe = module.hparams.get("recipe")
    if not recipe:
        raise ValueError(f"{checkpoint} has no formatting recipe in its hyperparameters; export the module "
                         f"with export_reranker(module.lm, formatter, out_dir) instead")
    formatter = PairFormatter.from_recipe(load_tokenizer(module.hparams["model"]), recipe)
    return export_reranker(module.lm, formatter, out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export a rerank-lightning checkpoint (SPEC 9)")
    parser.add_argument("checkpoint")
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    print(f"exported model: {export_checkpoint(args.checkpoint, args.out_dir)}")


if __name__ == "__main__":
    main()
