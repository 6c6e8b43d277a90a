"""Export (SPEC 9): a Hugging Face directory with merged weights (or a LoRA adapter), tokenizer and recipe.

From a Lightning checkpoint: `rerank-lightning export CHECKPOINT OUT_DIR [--adapter-only]`.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from pathlib import Path
from typing import Any, Mapping

import torch

from ..data.formatting import PairFormatter, ensure_pad_token, formatter_from_recipe
from .clients import (
    make_portable, matching_score_template, write_score_template, write_sentence_transformers_files, write_vllm_files,
)
from .model_card import write_model_card

log = logging.getLogger(__name__)
RECIPE_FILE = "reranker_config.json"
FORMAT_VERSION = 1
PADDING_SIDE = "left"  # what the instruction recipe trains with; scores do not depend on it (SPEC 3)


def export_reranker(lm: torch.nn.Module, formatter: PairFormatter, out_dir: str | Path,
                    merge: bool = True, base_model: dict[str, Any] | None = None,
                    card: Mapping[str, Any] | None = None) -> Path:
    """Write `lm`, its tokenizer, the recipe, the other clients' files and a model card to `out_dir`.

    A LoRA model is merged into its base in place (`merge_and_unload`, so export last), or with
    `merge=False` saved as the adapter alone plus `base_model` (the `conf/model` block that loads
    the base), which `Reranker.from_pretrained` uses to rebuild it. Weights keep their dtype.
    `card`: what the model card should say beyond the recipe (`base_model`, `train_data`, `metrics`).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    recipe: dict[str, Any] = {"format_version": FORMAT_VERSION, "score": "yes_logit", **formatter.recipe()}
    is_peft = hasattr(lm, "merge_and_unload")
    merged = not (is_peft and not merge)
    if not merged:  # the caller's model stays as it is; peft saves only the adapter
        if not base_model:
            raise ValueError("an adapter-only export (merge=False) needs base_model, the config that loads the base")
        recipe["base_model"] = base_model
    else:
        if is_peft:
            lm = lm.merge_and_unload(progressbar=True)
        lm.config.use_cache = True
    lm.save_pretrained(out_dir)
    tokenizer = ensure_pad_token(copy.deepcopy(formatter.tokenizer))  # the caller's tokenizer stays as it was
    tokenizer.padding_side = PADDING_SIDE
    tokenizer.save_pretrained(out_dir)
    make_portable(out_dir, PADDING_SIDE, tokenizer.pad_token)
    (out_dir / RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n")

    template = vllm = None
    if merged and formatter.name == "instruction":  # a plain causal LM scored by its "Yes" logit
        template = matching_score_template(formatter)
        if template is None:
            log.warning("no score template reproduces this tokenizer's pair token ids: the export carries no "
                        "sentence-transformers / vLLM files")
        else:
            write_score_template(out_dir, template)
            write_sentence_transformers_files(out_dir, formatter.yes_id)
            yes_token = formatter.tokenizer.convert_ids_to_tokens(formatter.yes_id)
            vllm = write_vllm_files(out_dir, lm.config.architectures[0], yes_token)
    card = dict(card or {})
    card.setdefault("base_model", (base_model or {}).get("pretrained") or getattr(lm.config, "name_or_path", None))
    write_model_card(out_dir, recipe, card, template is not None, vllm)
    log.info("exported reranker to %s", out_dir)
    return out_dir


def export_module(module: Any, formatter: PairFormatter, out_dir: str | Path, merge: bool = True,
                  base_model: dict[str, Any] | None = None, card: Mapping[str, Any] | None = None) -> Path:
    """Export a trained `RerankerModule`, or a `MatryoshkaModule` (its heads too, or its compensation adapter)."""
    if module.hparams.get("matryoshka"):
        from .matryoshka_export import export_matryoshka_module

        return export_matryoshka_module(module, formatter, out_dir, merge=merge, base_model=base_model)
    return export_reranker(module.lm, formatter, out_dir, merge=merge, base_model=base_model, card=card)


def export_from_trainer(trainer: Any, module: Any, formatter: PairFormatter, out_dir: str | Path,
                        merge: bool = True, base_model: dict[str, Any] | None = None) -> Path | None:
    """Export the model `trainer` trained; call it on every rank. Returns `out_dir` on global rank 0, else None.

    Unsharded (one device, DDP): rank 0 exports `module` as `export_module` does. Sharded (FSDP):
    every rank takes part in gathering the full state dict to rank 0's CPU; rank 0 loads it into a
    fresh, unwrapped copy of the module (built from its hyperparameters) and exports that, so the
    export holds every weight, never one rank's shard. The model card gets the trainer's last
    validation metrics and the training data.
    """
    from ..strategies import full_state_dict, is_sharded

    strategy = trainer.strategy
    card = {
        "base_model": _model_name(module.hparams.get("model") or {}),
        "train_data": getattr(getattr(getattr(trainer, "datamodule", None), "args", None), "train_data", None),
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
    }
    out = None
    if is_sharded(strategy.model):
        state = full_state_dict(strategy.model)  # collective; the tensors land on rank 0 only
        if trainer.is_global_zero:
            fresh = unwrapped_module(module, state)
            del state
            out = export_module(fresh, formatter, out_dir, merge=merge, base_model=base_model, card=card)
    elif trainer.is_global_zero:
        out = export_module(module, formatter, out_dir, merge=merge, base_model=base_model, card=card)
    strategy.barrier("export")
    return out


def _model_name(model_cfg: Mapping[str, Any]) -> str | None:
    """How a user names the base model: its hub id or folder, else the package that ships it."""
    if model_cfg.get("pretrained"):
        return str(model_cfg["pretrained"])
    if model_cfg.get("package"):
        return f"{model_cfg.get('gguf_file') or model_cfg.get('name')} (Python package {model_cfg['package']})"
    return model_cfg.get("name")


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
    (read in this one process, no process group needed). Nothing in the files is unpickled beyond tensors
    and plain containers; a file that is not a train.py checkpoint raises `CheckpointError`."""
    from ..checkpoints import CheckpointError, read_checkpoint
    from ..strategies import WEIGHTS_KEY, sharded_weight_names

    path = Path(checkpoint)
    hparams = read_checkpoint(path, need=("state_dict", "hyper_parameters")).get("hyper_parameters") or {}
    if not isinstance(hparams, dict) or not {"model", "recipe"} <= set(hparams):
        raise CheckpointError(f"{path} is not a rerank-lightning checkpoint (its hyper_parameters lack "
                              f"'model' and 'recipe', which train.py records)")
    if not path.is_dir():
        return module_class(hparams).load_from_checkpoint(path, map_location="cpu", weights_only=True)
    import torch.distributed.checkpoint as dcp

    module = module_class(hparams)(**hparams)
    module.configure_model()
    reader = dcp.FileSystemReader(path)
    saved = sharded_weight_names(path)
    state = {k: v for k, v in module.state_dict().items() if k in saved}
    if unknown := saved - set(state):
        raise CheckpointError(f"{path} holds weights the model does not have: {sorted(unknown)[:5]}")
    if module.strict_loading and (absent := set(module.state_dict()) - saved):
        raise CheckpointError(f"{path} lacks weights of the model: {sorted(absent)[:5]}")
    dcp.load({WEIGHTS_KEY: state}, storage_reader=reader, no_dist=True)  # in place, into the module's tensors
    module.load_state_dict(state, strict=module.strict_loading)
    module.eval()
    return module


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, merge: bool = True) -> Path:
    """Export a `RerankerModule` checkpoint written by train.py (its hyperparameters hold model and recipe):
    a checkpoint file, or the directory of shards that `trainer=fsdp` writes."""
    from ..model import load_tokenizer

    module = load_module_checkpoint(checkpoint)
    formatter = formatter_from_recipe(load_tokenizer(module.hparams["model"]), module.hparams["recipe"])
    return export_module(module, formatter, out_dir, merge=merge, base_model=module.hparams["model"])


def main(argv: list[str] | None = None) -> int:
    """`rerank-lightning export CHECKPOINT OUT_DIR`: 0 on success; a bad checkpoint or an output path that
    cannot be written prints one `error:` line and returns 2."""
    from ..checkpoints import CheckpointError
    from ..model import WeightsUnavailableError

    parser = argparse.ArgumentParser(prog="rerank-lightning export",
                                     description="Write a Hugging Face directory (merged weights or a LoRA adapter, tokenizer, "
                                                 "recipe, the files other clients read, a model card) from a "
                                                 "checkpoint that train.py wrote.")
    parser.add_argument("checkpoint", help="a .ckpt file written by train.py, or a sharded checkpoint directory")
    parser.add_argument("out_dir", help="the directory to write (created; files in it are replaced)")
    parser.add_argument("--adapter-only", action="store_true", help="LoRA: save the adapter, not merged weights")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    try:
        if out.exists() and not out.is_dir():
            raise CheckpointError(f"out_dir {out} exists and is not a directory")
        print(f"exported model: {export_checkpoint(args.checkpoint, out, merge=not args.adapter_only)}")
    except (CheckpointError, WeightsUnavailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
