"""`Reranker`: load an exported directory and score (query, passage) pairs as in training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from ..data.formatting import PairFormatter, pad_token_id
from ..data.instruction import pad_batch
from ..model.scoring import answer_logits, score_positions
from .export import FORMAT_VERSION, RECIPE_FILE


class Reranker:
    """Scores pairs with the exported model: the "Yes" logit after the recipe's prompt."""

    def __init__(self, lm: torch.nn.Module, formatter: PairFormatter, batch_size: int = 16):
        self.lm, self.formatter, self.batch_size = lm.eval(), formatter, batch_size
        self.pad_id = pad_token_id(formatter.tokenizer)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, batch_size: int = 16) -> "Reranker":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        recipe_path = path / RECIPE_FILE
        if not recipe_path.is_file():
            raise FileNotFoundError(f"{path} is not an exported reranker: {RECIPE_FILE} is missing")
        recipe = json.loads(recipe_path.read_text())
        if recipe.get("format_version") != FORMAT_VERSION or recipe.get("recipe") != "instruction":
            raise ValueError(f"{recipe_path}: unsupported recipe {recipe.get('recipe')!r} "
                             f"version {recipe.get('format_version')!r}")
        formatter = PairFormatter.from_recipe(AutoTokenizer.from_pretrained(path), recipe)
        if recipe.get("base_model"):  # adapter-only export: rebuild the base, apply and merge the adapter
            from peft import PeftModel

            from ..model.backbone import load_causal_lm

            base = load_causal_lm(recipe["base_model"], vocab_size=len(formatter.tokenizer))
            lm = PeftModel.from_pretrained(base, path).merge_and_unload()
            if dtype is not None:
                lm = lm.to(dtype)
        else:
            lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
        if device is not None:
            lm = lm.to(device)
        return cls(lm, formatter, batch_size)

    @torch.no_grad()
    def score(self, pairs: Sequence[tuple[str, str]] | tuple[str, str], prompt: str | None = None,
              batch_size: int | None = None, progress: bool | None = None) -> list[float]:
        """One score per (query, passage) pair; higher means more relevant."""
        single = isinstance(pairs, tuple) and len(pairs) == 2 and isinstance(pairs[0], str)
        pairs = [pairs] if single else list(pairs)
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

    def rerank(self, query: str, passages: Iterable[str], prompt: str | None = None) -> list[tuple[int, float]]:
        """(passage index, score) pairs, best first."""
        passages = list(passages)
        scores = self.score([(query, p) for p in passages], prompt=prompt)
        return sorted(enumerate(scores), key=lambda x: -x[1])
