"""Export (SPEC 9): a Hugging Face directory with merged weights (or a LoRA adapter), tokenizer and recipe.

From a Lightning checkpoint: `python -m rerank_lightning.inference.export CHECKPOINT OUT_DIR [--adapter-only]`.
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


def export_reranker(lm: torch.nn.Module, formatter: PairFormatter, out_dir: str | Path,
                    merge: bool = True, base_model: dict[str, Any] | None = None) -> Path:
    """Write `lm`, its tokenizer and the recipe to `out_dir`.

    A LoRA model is merged into its base in place (`merge_and_unload`, so export last), or with
    `merge=False` saved as the adapter alone plus `base_model` (the `conf/model` block that loads
    the base), which `Reranker.from_pretrained` uses to rebuild it. Weights keep their dtype.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    recipe: dict[str, Any] = {"format_version": FORMAT_VERSION, "score": "yes_logit", **formatter.recipe()}
    is_peft = hasattr(lm, "merge_and_unload")
    if is_peft and not merge:  # the caller's model stays as it is; peft saves only the adapter
        if not base_model:
            raise ValueError("an adapter-only export (merge=False) needs base_model, the config that loads the base")
        recipe["base_model"] = base_model
    else:
        if is_peft:
            lm = lm.merge_and_unload(progressbar=True)
        lm.config.use_cache = True
    lm.save_pretrained(out_dir)
    tokenizer = ensure_pad_token(copy.deepcopy(formatter.tokenizer))  # the caller's tokenizer stays as it was
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(out_dir)
    (out_dir / RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n")
    log.info("exported reranker to %s", out_dir)
    return out_dir


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, merge: bool = True) -> Path:
    """Export a `RerankerModule` checkpoint written by train.py (its hyperparameters hold model and recipe)."""
    from ..model import RerankerModule, load_tokenizer

    module = RerankerModule.load_from_checkpoint(checkpoint, map_location="cpu")
    recipe = module.hparams.get("recipe")
    if not recipe:
        raise ValueError(f"{checkpoint} has no formatting recipe in its hyperparameters; export the module "
                         f"with export_reranker(module.lm, formatter, out_dir) instead")
    formatter = PairFormatter.from_recipe(load_tokenizer(module.hparams["model"]), recipe)
    return export_reranker(module.lm, formatter, out_dir, merge=merge, base_model=module.hparams["model"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export a rerank-lightning checkpoint (SPEC 9)")
    parser.add_argument("checkpoint")
    parser.add_argument("out_dir")
    parser.add_argument("--adapter-only", action="store_true", help="LoRA: save the adapter, not merged weights")
    args = parser.parse_args(argv)
    print(f"exported model: {export_checkpoint(args.checkpoint, args.out_dir, merge=not args.adapter_only)}")


if __name__ == "__main__":
    main()
