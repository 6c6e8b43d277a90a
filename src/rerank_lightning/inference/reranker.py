"""`Reranker`: load an exported directory and score (query, passage) pairs as in training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.formatting import FORMATTERS, FormatConfigError, PairFormatter, formatter_from_recipe, pad_token_id
from ..data.padding import pad_batch
from ..model.scoring import answer_logits, score_positions
from .export import FORMAT_VERSION, RECIPE_FILE


def default_device(name: str | torch.device | None = None) -> torch.device:
    """The device named, else the first GPU when there is one, else the CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


class Reranker:
    """Scores pairs with the exported model: the "Yes" logit after the recipe's prompt.

    Reads like sentence-transformers' `CrossEncoder`: `predict(pairs)` gives one score per pair,
    `rank(query, passages, top_k)` the passages best first.

    A Matryoshka export (SPEC 7) scores with its layer-wise heads at any exit layer, compress
    layers and ratio chosen per call, and switches to the compensation adapter that matches
    (`compensation/width_r<ratio>` when compressing, else `compensation/depth` below the top exit).
    """

    def __init__(self, lm: torch.nn.Module, formatter: PairFormatter, batch_size: int = 16,
                 heads: torch.nn.Module | None = None, matryoshka: dict | None = None,
                 adapters: Sequence[str] = ()):
        self.lm, self.formatter, self.batch_size = lm.eval(), formatter, batch_size
        self.pad_id = pad_token_id(formatter.tokenizer)
        self.heads = heads.eval() if heads is not None else None
        self.matryoshka = matryoshka or {}
        self.adapters = list(adapters)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | str | None = None, batch_size: int = 16) -> "Reranker":
        """Load an export. `device` None: CUDA when there is one, else CPU. `dtype` (a torch dtype or its
        name, e.g. "bfloat16") None: the dtype the weights were saved in."""
        from transformers import AutoModelForCausalLM

        from ..model.backbone import MODEL_LOAD_KWARGS, auto_tokenizer

        path = Path(path)
        recipe_path = path / RECIPE_FILE
        if not recipe_path.is_file():
            raise FileNotFoundError(f"{path} is not an exported reranker: {RECIPE_FILE} is missing")
        try:
            recipe = json.loads(recipe_path.read_text())
        except json.JSONDecodeError as err:
            raise FormatConfigError(f"{recipe_path}:{err.lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(recipe, dict):
            raise FormatConfigError(f"{recipe_path}: expected a JSON object, got {type(recipe).__name__}")
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        device = default_device(device)
        if recipe.get("format_version") != FORMAT_VERSION or recipe.get("recipe") not in FORMATTERS:
            raise FormatConfigError(f"{recipe_path}: unsupported recipe {recipe.get('recipe')!r} version "
                                    f"{recipe.get('format_version')!r} (this version reads format_version "
                                    f"{FORMAT_VERSION} with recipe {' or '.join(map(repr, FORMATTERS))})")
        formatter = formatter_from_recipe(auto_tokenizer(str(path)), recipe)
        if recipe.get("base_model"):  # adapter-only export: rebuild the base, apply and merge the adapter
            from peft import PeftModel

            from ..model.backbone import load_causal_lm

            base = load_causal_lm(recipe["base_model"], vocab_size=len(formatter.tokenizer))
            lm = PeftModel.from_pretrained(base, path).merge_and_unload()
            if dtype is not None:
                lm = lm.to(dtype)
        else:
            lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", **MODEL_LOAD_KWARGS)
        heads, adapters = None, []
        if recipe["recipe"] == "matryoshka":
            from ..model.matryoshka import load_heads

            heads = load_heads(path)
            lm, adapters = _load_compensation(lm, path)
        lm = lm.to(device)
        heads = heads.to(device) if heads is not None else None
        return cls(lm, formatter, batch_size, heads, recipe.get("matryoshka"), adapters)

    def predict(self, pairs: Sequence[tuple[str, str]], batch_size: int | None = None,
                show_progress_bar: bool | None = None, prompt: str | None = None) -> np.ndarray:
        """One score per (query, passage) pair, as `CrossEncoder.predict` returns them (float32 array)."""
        return np.asarray(self.score(list(pairs), prompt=prompt, batch_size=batch_size, progress=show_progress_bar),
                          dtype=np.float32)

    def rank(self, query: str, passages: Sequence[str], top_k: int | None = None, return_documents: bool = False,
             batch_size: int | None = None, show_progress_bar: bool | None = None,
             prompt: str | None = None) -> list[dict[str, Any]]:
        """The passages best first, as `CrossEncoder.rank` gives them: `{"corpus_id", "score"}` (and `"text"`
        with `return_documents`), the top `top_k` only when given; ties keep the passages' order."""
        passages = list(passages)
        scores = self.score([(query, p) for p in passages], prompt=prompt, batch_size=batch_size,
                            progress=show_progress_bar)
        order = sorted(range(len(passages)), key=lambda i: -scores[i])[:top_k]
        return [{"corpus_id": i, "score": scores[i], **({"text": passages[i]} if return_documents else {})}
                for i in order]

    @torch.no_grad()
    def score(self, pairs: Sequence[tuple[str, str]] | tuple[str, str], prompt: str | None = None,
              batch_size: int | None = None, progress: bool | None = None, exit_layer: int | None = None,
              compress_ratio: int = 1, compress_layers: Sequence[int] | None = None) -> list[float]:
        """One score per (query, passage) pair; higher means more relevant.

        Matryoshka exports: `exit_layer` (default: the top), `compress_ratio` (1: none) and
        `compress_layers` (default: the trained ones) choose the depth and width.
        """
        single = isinstance(pairs, tuple) and len(pairs) == 2 and isinstance(pairs[0], str)
        pairs = [pairs] if single else list(pairs)
        if self.heads is not None:
            layer = max(self.heads.layers) if exit_layer is None else int(exit_layer)
            scores = self.score_exits(pairs, [layer], compress_ratio, compress_layers, prompt, batch_size)[layer]
            return scores[0:1] if single else scores
        if exit_layer is not None or compress_ratio != 1 or compress_layers:
            raise ValueError("exit_layer / compress_ratio / compress_layers need a Matryoshka export")
        encoded = [self.formatter.encode_pair(q, p, prompt) for q, p in pairs]
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # similar lengths per batch
        batch_size = batch_size or self.batch_size
        device = next(self.lm.parameters()).device
        scores = [0.0] * len(encoded)
        starts = range(0, len(order), batch_size)
        show = progress if progress is not None else len(starts) > 20
        for start in tqdm(starts, desc="scoring", disable=not show):
            idx = order[start : start + batch_size]
            ids = pad_batch([encoded[i] for i in idx], self.pad_id, "left").to(device)
            mask = pad_batch([[1] * len(encoded[i]) for i in idx], 0, "left").to(device)
            logits = answer_logits(self.lm, ids, mask, score_positions(mask))
            for i, s in zip(idx, logits[:, self.formatter.yes_id].float().tolist()):
                scores[i] = s
        return scores[0:1] if single else scores

    def adapter_for(self, exit_layer: int, compress_ratio: int) -> str | None:
        """The compensation adapter for a depth / width (None: the stage-1 model as it is)."""
        if compress_ratio > 1 and f"width_r{compress_ratio}" in self.adapters:
            return f"width_r{compress_ratio}"
        if exit_layer < max(self.heads.layers) and "depth" in self.adapters:
            return "depth"
        return None

    @torch.no_grad()
    def score_exits(self, pairs: Sequence[tuple[str, str]], exits: Sequence[int] | None = None,
                    compress_ratio: int = 1, compress_layers: Sequence[int] | None = None, prompt: str | None = None,
                    batch_size: int | None = None) -> dict[int, list[float]]:
        """Matryoshka: {exit layer: one score per pair}; one pass per compensation adapter involved."""
        from contextlib import nullcontext

        from ..model.matryoshka import exit_scores

        if self.heads is None:
            raise ValueError("score_exits needs a Matryoshka export (layer-wise heads)")
        exits = self.heads.check(exits if exits is not None else self.heads.layers)
        layers = list(self.matryoshka.get("compress_layers", [])) if compress_layers is None else list(compress_layers)
        by_adapter: dict[str | None, list[int]] = {}
        for layer in exits:
            by_adapter.setdefault(self.adapter_for(layer, compress_ratio), []).append(layer)
        encoded = [self.formatter.encode_pair(q, p, prompt) for q, p in pairs]
        device = next(self.lm.parameters()).device
        batch_size = batch_size or self.batch_size
        method = self.matryoshka.get("compress_method", "attention")
        out: dict[int, list[float]] = {layer: [] for layer in exits}
        for adapter, group in by_adapter.items():
            if adapter is not None:
                self.lm.set_adapter(adapter)
            use_base = adapter is None and hasattr(self.lm, "disable_adapter")
            context = self.lm.disable_adapter() if use_base else nullcontext()
            with context:
                for start in range(0, len(encoded), batch_size):
                    chunk = encoded[start : start + batch_size]
                    ids = pad_batch([e[0] for e in chunk], self.pad_id, "right").to(device)
                    mask = pad_batch([[1] * len(e[0]) for e in chunk], 0, "right").to(device)
                    lengths = torch.tensor([[e[1], e[2]] for e in chunk], device=device)
                    scores = exit_scores(self.lm, self.heads, ids, mask, group, layers, compress_ratio,
                                         lengths[:, 0], lengths[:, 1], method)
                    for layer in group:
                        out[layer].extend(scores[layer].tolist())
        return out

    def rerank(self, query: str, passages: Iterable[str], prompt: str | None = None) -> list[tuple[int, float]]:
        """(passage index, score) pairs, best first."""
        return [(r["corpus_id"], r["score"]) for r in self.rank(query, list(passages), prompt=prompt)]


def _load_compensation(lm: torch.nn.Module, path: Path) -> tuple[torch.nn.Module, list[str]]:
    """Attach every adapter under `path/compensation/<name>/` (written by the compensation stage)."""
    folders = sorted(d for d in (path / "compensation").glob("*") if (d / "adapter_config.json").is_file())
    if not folders:
        return lm, []
    from peft import PeftModel

    lm = PeftModel.from_pretrained(lm, folders[0], adapter_name=folders[0].name)
    for folder in folders[1:]:
        lm.load_adapter(folder, adapter_name=folder.name)
    return lm.eval(), [d.name for d in folders]
