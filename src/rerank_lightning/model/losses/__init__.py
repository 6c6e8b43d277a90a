"""Training objectives (SPEC 6), one file per family, chosen by name from `loss.*` (conf/loss/).

Every loss reads [B, G] scores (B the real number of groups in the batch), optional graded
labels [B, G] (default: the positive in column 0) and an optional mask [B, G] of real candidates,
and is computed in fp32 whatever the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from .distillation import distillation, margin_mse
from .listwise import listnet, listwise_ce
from .matryoshka import SELF_DISTILL_METHODS, matryoshka_loss, self_distill_teachers
from .pairwise import lambdaloss, ranknet
from .pointwise import pointwise_bce, pointwise_ce


@dataclass(frozen=True)
class ScoredGroups:
    """One training batch as the losses see it."""

    scores: torch.Tensor              # [B, G] "Yes" logits, positive first
    labels: torch.Tensor | None       # [B, G] grades; None: FlagEmbedding's one positive in column 0
    mask: torch.Tensor | None         # [B, G] real candidates; None: all
    answer_logits: torch.Tensor       # [B*G, V] full-vocabulary logits at the answer position
    answer_label_ids: torch.Tensor    # [B*G] the Yes/No token each row should answer


Objective = Callable[[ScoredGroups, Mapping[str, Any]], torch.Tensor]

# loss.objective: the loss on the data's labels.
OBJECTIVES: dict[str, Objective] = {
    "listwise": lambda g, cfg: listwise_ce(g.scores, g.labels, g.mask),
    "pointwise": lambda g, cfg: pointwise_ce(g.answer_logits, g.answer_label_ids),
    "bce": lambda g, cfg: pointwise_bce(g.scores, g.labels, g.mask),
    "ranknet": lambda g, cfg: ranknet(g.scores, g.labels, g.mask, sigma=cfg["sigma"]),
    "listnet": lambda g, cfg: listnet(g.scores, g.labels, g.mask),
    "lambdaloss": lambda g, cfg: lambdaloss(g.scores, g.labels, g.mask, sigma=cfg["sigma"]),
}

# loss.distill: the term on teacher scores, added with loss.distill_weight when the batch has them.
DISTILLATIONS: dict[str, Callable[[torch.Tensor, ScoredGroups, Mapping[str, Any]], torch.Tensor]] = {
    "kd": lambda teacher, g, cfg: distillation(teacher, g.scores, cfg["temperature"], g.mask),
    "margin_mse": lambda teacher, g, cfg: margin_mse(teacher, g.scores, g.mask),
}

LOSS_DEFAULTS = {"objective": "listwise", "distill": "kd", "distill_weight": 1.0, "temperature": 1.0, "sigma": 1.0}


def loss_config(loss: Mapping[str, Any] | None) -> dict[str, Any]:
    """`loss.*` with defaults filled in; ValueError naming the key and its allowed values."""
    cfg = {**LOSS_DEFAULTS, **(loss or {})}
    unknown = sorted(set(cfg) - set(LOSS_DEFAULTS))
    if unknown:
        raise ValueError(f"loss.{unknown[0]}: unknown key; known keys are {sorted(LOSS_DEFAULTS)}")
    for key, names in (("objective", OBJECTIVES), ("distill", DISTILLATIONS)):
        if cfg[key] not in names:
            raise ValueError(f"loss.{key} must be one of {tuple(names)}, got {cfg[key]!r}")
    for key, low, strict in (("temperature", 0.0, True), ("sigma", 0.0, True), ("distill_weight", 0.0, False)):
        value = cfg[key]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value > low if strict else value >= low)
        if not ok:
            raise ValueError(f"loss.{key} must be a number {'>' if strict else '>='} {low:g}, got {value!r}")
    return cfg


__all__ = [
    "DISTILLATIONS", "LOSS_DEFAULTS", "OBJECTIVES", "SELF_DISTILL_METHODS", "ScoredGroups", "distillation",
    "lambdaloss", "listnet", "listwise_ce", "loss_config", "margin_mse", "matryoshka_loss", "pointwise_bce",
    "pointwise_ce", "ranknet", "self_distill_teachers",
]
