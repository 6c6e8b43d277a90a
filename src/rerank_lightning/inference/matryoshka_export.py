"""Export of a Matryoshka re-ranker (SPEC 7, 9).

Stage 1 writes a normal export (merged weights, tokenizer, `reranker_config.json` with the
Matryoshka settings) plus the layer-wise heads. Stage 2 (compensation) adds its adapter to the
stage-1 folder as `compensation/depth` or `compensation/width_r<ratio>`, so that one folder
serves every depth and width and `Reranker` picks the adapter that matches a request.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..data.formatting import PairFormatter
from ..model.matryoshka import HEADS_FILE, LayerwiseHeads, compensation_name
from .export import RECIPE_FILE, export_reranker

COMPENSATION_FILE = "compensation.json"
RECIPE_KEYS = ("compress_layers", "compress_ratios", "compress_method", "start_layer", "layer_sep")


def export_matryoshka(lm: torch.nn.Module, heads: LayerwiseHeads, formatter: PairFormatter, out_dir: str | Path,
                      settings: dict[str, Any], merge: bool = True, base_model: dict[str, Any] | None = None) -> Path:
    """Stage 1: the model as `export_reranker` writes it, the heads, and the exits / compression settings."""
    from safetensors.torch import save_file

    out = export_reranker(lm, formatter, out_dir, merge=merge, base_model=base_model)
    save_file({k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}, str(out / HEADS_FILE))
    recipe = json.loads((out / RECIPE_FILE).read_text())
    recipe["score"] = "matryoshka_heads"
    recipe["matryoshka"] = {"exits": heads.layers, **{k: settings[k] for k in RECIPE_KEYS if k in settings}}
    (out / RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n")
    return out


def export_matryoshka_module(module: Any, formatter: PairFormatter, out_dir: str | Path, merge: bool = True,
                             base_model: dict[str, Any] | None = None) -> Path:
    """A trained `MatryoshkaModule`. Stage 1: model, heads and settings to `out_dir`. Compensation: the
    adapter alone, into the stage-1 export it started from (`<model.pretrained>/compensation/<depth|width_rN>`)."""
    mcfg = module.mcfg
    if mcfg["stage"] == "compensation":
        ratio = 1 if mcfg["factor"] == "depth" else int(mcfg["compress_ratios"][0])
        return export_compensation(module.lm, module.model_cfg["pretrained"], mcfg["factor"], ratio)
    return export_matryoshka(module.lm, module.heads, formatter, out_dir, mcfg, merge=merge, base_model=base_model)


def export_compensation(lm: torch.nn.Module, stage1_dir: str | Path, factor: str, ratio: int) -> Path:
    """Stage 2: the compensation adapter alone, into `<stage-1 export>/compensation/<name>`."""
    if not hasattr(lm, "peft_config"):
        raise ValueError("the compensation stage exports a LoRA adapter, but the model has none")
    stage1_dir = Path(stage1_dir)
    if not (stage1_dir / HEADS_FILE).is_file():
        raise FileNotFoundError(f"{stage1_dir} is not a Matryoshka stage-1 export ({HEADS_FILE} missing)")
    out = stage1_dir / "compensation" / compensation_name(factor, ratio)
    lm.save_pretrained(out)
    (out / COMPENSATION_FILE).write_text(json.dumps({"factor": factor, "ratio": int(ratio)}, indent=2) + "\n")
    return out
