"""Listwise losses: a softmax over each group's candidates."""

from __future__ import annotations

import torch

from .groups import group_labels, group_mask, masked_log_softmax


def listwise_ce(scores: torch.Tensor, labels: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """-mean_b sum_i p_bi log softmax(s_b)_i with p_b = y_b / sum(y_b) (SPEC 6).

    With FlagEmbedding's groups (labels None) p_b is one-hot on column 0, the positive; with graded
    labels each positive weighs by its grade. Groups without a positive label are left out.
    """
    labels, mask = group_labels(scores, labels), group_mask(scores, mask)
    labels = torch.where(mask, labels, torch.zeros_like(labels))
    total = labels.sum(-1)
    keep = total > 0
    if not keep.any():
        return scores.new_zeros((), dtype=torch.float32)
    target = labels[keep] / total[keep, None]
    return -(target * masked_log_softmax(scores[keep], mask[keep])).sum(-1).mean()


def listnet(scores: torch.Tensor, labels: torch.Tensor | None = None,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """ListNet's top-one loss (Cao et al. 2007): -mean_b sum_i softmax(y_b)_i log softmax(s_b)_i."""
    labels, mask = group_labels(scores, labels), group_mask(scores, mask)
    target = masked_log_softmax(labels, mask).exp() * mask
    return -(target * masked_log_softmax(scores, mask)).sum(-1).mean()
