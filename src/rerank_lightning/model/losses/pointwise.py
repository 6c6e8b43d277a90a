"""Pointwise losses: each candidate on its own."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .groups import group_labels, group_mask


def pointwise_ce(logits: torch.Tensor, label_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the Yes/No label token over the full vocabulary at the labelled position."""
    return F.cross_entropy(logits.float(), label_ids)


def pointwise_bce(scores: torch.Tensor, labels: torch.Tensor | None = None,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy of sigmoid(s) against relevance (grade > 0), the mean over real candidates."""
    labels, mask = group_labels(scores, labels), group_mask(scores, mask)
    return F.binary_cross_entropy_with_logits(scores.float()[mask], (labels[mask] > 0).float())
