"""A tiny exported reranker (random weights, Mistral's tokenizer) for command-line tests."""

from pathlib import Path

import torch

from conftest import TINY_MODEL


def write_tiny_export(out_dir: Path, tokenizer) -> Path:
    """Export the random-init tiny model as train.py would (SPEC 9) to `out_dir`."""
    from rerank_lightning.data import PairFormatter
    from rerank_lightning.inference import export_reranker
    from rerank_lightning.model import load_causal_lm

    torch.manual_seed(0)
    lm = load_causal_lm(TINY_MODEL, len(tokenizer))
    return export_reranker(lm, PairFormatter(tokenizer), out_dir)
