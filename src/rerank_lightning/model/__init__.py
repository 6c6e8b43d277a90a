"""Model: backbone loading, pair scoring, losses and the LightningModule."""

from .backbone import WeightsUnavailableError, load_causal_lm, load_tokenizer, resolve_pretrained
from .losses import distillation, listwise_ce, pointwise_ce
from .scoring import answer_logits, score_positions


def __getattr__(name: str):
    # Imported on first use: the LightningModule needs Lightning, which scoring an export does not.
    if name == "RerankerModule":
        from .module import RerankerModule

        return RerankerModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "RerankerModule", "WeightsUnavailableError", "answer_logits", "distillation", "listwise_ce",
    "load_causal_lm", "load_tokenizer", "pointwise_ce", "resolve_pretrained", "score_positions",
]
