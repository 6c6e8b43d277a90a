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

from ..data.formatting import PairFormatter, ensure_pad_token, formatter_from_recipe

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


def export_from_trainer(trainer: Any, module: Any, formatter: PairFormatter, out_dir: str | Path,
                        merge: bool = True, base_model: dict[str, Any] | None = None) -> Path | None:
    """Export the model `trainer` trained; call it on every rank. Returns `out_dir` on global rank 0, else None.

    Unsharded (one device, DDP): rank 0 exports `module.lm` as `export_reranker` does. Sharded (FSDP):
    every rank takes part in gathering the full state dict to rank 0's CPU; rank 0 loads it into a
    fresh, unwrapped copy of the module (built from its hyperparameters) and exports that, so the
    export holds every weight, never one rank's shard.
    """
    from ..strategies import full_state_dict, is_sharded

    strategy = trainer.strategy
    out = None
    if is_sharded(strategy.model):
        state = full_state_dict(strategy.model)  # collective; the tensors land on rank 0 only
        if trainer.is_global_zero:
            fresh = unwrapped_module(module, state)
            del state
            out = fresh.export_model(formatter, out_dir, merge=merge, base_model=base_model)
    elif trainer.is_global_zero:
        out = module.export_model(formatter, out_dir, merge=merge, base_model=base_model)
    strategy.barrier("export")
    return out


def unwrapped_module(module: Any, state: dict[str, torch.Tensor]) -> Any:
    """A fresh copy of `module` (same class and hyperparameters, own weights) holding `state`, a full
    state dict of the module (`lm.*`, and `heads.*` for a Matryoshka module)."""
    fresh = type(module)(**dict(module.hparams))
    fresh.configure_model()
    fresh.load_state_dict(state, strict=fresh.strict_loading)
    return fresh


def module_class(hparams: dict[str, Any]) -> type:
    """`MatryoshkaModule` for checkpoints of the Matryoshka experiments, else `RerankerModule`."""
    from ..model import RerankerModule
    from ..model.matryoshka_module import MatryoshkaModule

    return MatryoshkaModule if hparams.get("matryoshka") else RerankerModule


def load_module_checkpoint(checkpoint: str | Path) -> Any:
    """A `RerankerModule` on CPU from a checkpoint file or from the sharded directory of `trainer=fsdp`
    (read in this one process, no process group needed)."""
    path = Path(checkpoint)
    if not path.is_dir():
        hparams = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("hyper_parameters", {})
        return module_class(hparams).load_from_checkpoint(path, map_location="cpu")
    import torch.distributed.checkpoint as dcp

    from ..strategies import CHECKPOINT_METADATA, WEIGHTS_KEY, sharded_weight_names

    if not (path / CHECKPOINT_METADATA).is_file():
        raise FileNotFoundError(f"{path} is a directory but not a sharded checkpoint (no {CHECKPOINT_METADATA})")
    meta = torch.load(path / CHECKPOINT_METADATA, map_location="cpu", weights_only=False)
    module = module_class(meta["hyper_parameters"])(**meta["hyper_parameters"])
    module.configure_model()
    reader = dcp.FileSystemReader(path)
    saved = sharded_weight_names(path)
    state = {k: v for k, v in module.state_dict().items() if k in saved}
    if unknown := saved - set(state):
        raise KeyError(f"{path} holds weights the model does not have: {sorted(unknown)[:5]}")
    if module.strict_loading and (absent := set(module.state_dict()) - saved):
        raise KeyError(f"{path} lacks weights of the model: {sorted(absent)[:5]}")
    dcp.load({WEIGHTS_KEY: state}, storage_reader=reader, no_dist=True)  # in place, into the module's tensors
    module.load_state_dict(state, strict=module.strict_loading)
    module.eval()
    return module


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, merge: bool = True) -> Path:
    """Export a `RerankerModule` checkpoint written by train.py (its hyperparameters hold model and recipe):
    a checkpoint file, or the directory of shards that `trainer=fsdp` writes."""
    from ..model import load_tokenizer

    module = load_module_checkpoint(checkpoint)
    recipe = module.hparams.get("recipe")
    if not recipe:
        raise ValueError(f"{checkpoint} has no formatting recipe in its hyperparameters; export the module "
                         f"with export_reranker(module.lm, formatter, out_dir) instead")
    formatter = formatter_from_recipe(load_tokenizer(module.hparams["model"]), recipe)
    return module.export_model(formatter, out_dir, merge=merge, base_model=module.hparams["model"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export a rerank-lightning checkpoint (SPEC 9)")
    parser.add_argument("checkpoint")
    parser.add_argument("out_dir")
    parser.add_argument("--adapter-only", action="store_true", help="LoRA: save the adapter, not merged weights")
    args = parser.parse_args(argv)
    print(f"exported model: {export_checkpoint(args.checkpoint, args.out_dir, merge=not args.adapter_only)}")


if __name__ == "__main__":
    main()
