"""Model: backbone loading, pair scoring, losses and the LightningModule."""

from .backbone import WeightsUnavailableError, load_causal_lm, load_tokenizer, resolve_pretrained
from .losses import distillation, listwise_ce, pointwise_ce
from .module import RerankerModule
from .scoring import answer_logits, score_positions

__all__ = [
    "RerankerModule", "WeightsUnavailableError", "answer_logits", "distillation", "listwise_ce",
    "load_causal_lm", "load_tokenizer", "pointwise_ce", "resolve_pretrained", "score_positions",
]
