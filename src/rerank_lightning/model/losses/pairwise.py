"""Pairwise losses: every pair of a group's candidates with different grades."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .groups import group_labels, group_mask, real_pairs


def _pair_logistic(scores: torch.Tensor, sigma: float) -> torch.Tensor:
    """[B, G, G]: log(1 + exp(-sigma (s_i - s_j))), in nats."""
    s = scores.float()
    return F.softplus(-sigma * (s[:, :, None] - s[:, None, :]))


def ranknet(scores: torch.Tensor, labels: torch.Tensor | None = None, mask: torch.Tensor | None = None,
            sigma: float = 1.0) -> torch.Tensor:
    """RankNet (Burges et al. 2005): the mean over all pairs (i above j in grade, same group, both
    real) of log(1 + exp(-sigma (s_i - s_j)))."""
    labels, mask = group_labels(scores, labels), group_mask(scores, mask)
    pairs = real_pairs(labels, mask)
    if not pairs.any():
        return scores.new_zeros((), dtype=torch.float32)
    return _pair_logistic(scores, sigma)[pairs].mean()


def lambdaloss(scores: torch.Tensor, labels: torch.Tensor | None = None, mask: torch.Tensor | None = None,
               sigma: float = 1.0) -> torch.Tensor:
    """LambdaLoss, variant NDCG-Loss2 (Wang et al. 2018, eq. 13): per group

        sum over pairs with y_i > y_j of  delta_ij |y_i - y_j| / IDCG * log2(1 + exp(-sigma (s_i - s_j)))

    with delta_ij = |1/log2(1 + |r_i - r_j|) - 1/log2(2 + |r_i - r_j|)|, r the 1-based ranks under the
    current scores (ties by column), gains the grades themselves (this project's nDCG, as trec_eval),
    IDCG over the group's real candidates; the mean over groups with a non-zero IDCG.
    """
    labels, mask = group_labels(scores, labels), group_mask(scores, mask)
    labels = torch.where(mask, labels, torch.zeros_like(labels))
    with torch.no_grad():
        order = scores.float().masked_fill(~mask, float("-inf")).sort(dim=-1, descending=True, stable=True).indices
        ranks = torch.empty_like(order)
        positions = torch.arange(1, scores.shape[1] + 1, device=scores.device).expand_as(order)
        ranks.scatter_(1, order, positions)
        gap = (ranks[:, :, None] - ranks[:, None, :]).abs().float()
        delta = (1.0 / torch.log2(1.0 + gap.clamp(min=1)) - 1.0 / torch.log2(2.0 + gap)).abs()
        discounts = 1.0 / torch.log2(positions.float() + 1.0)
        idcg = (labels.sort(dim=-1, descending=True).values * discounts).sum(-1)
        weights = delta * (labels[:, :, None] - labels[:, None, :]).abs()
        weights = weights * real_pairs(labels, mask) / idcg.clamp(min=1e-12)[:, None, None]
    keep = idcg > 0
    if not keep.any():
        return scores.new_zeros((), dtype=torch.float32)
    per_group = (weights * _pair_logistic(scores, sigma) / math.log(2)).sum((1, 2))
    return per_group[keep].mean()
