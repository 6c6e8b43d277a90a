"""What every ranking loss reads: a group's scores, graded labels and which candidates are real."""

from __future__ import annotations

import torch


def group_labels(scores: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """[B, G] float grades; None means FlagEmbedding's group: the positive in column 0 (grade 1), the rest 0."""
    if labels is not None:
        return labels.float()
    out = torch.zeros_like(scores, dtype=torch.float32)
    out[:, 0] = 1.0
    return out


def group_mask(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B, G] bool, True for a real candidate, False for padding; None means all real."""
    return torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.bool()


def masked_log_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log softmax over the real candidates of each row; 0 (not -inf) at padding, so 0 * it stays 0."""
    logp = torch.log_softmax(scores.float().masked_fill(~mask, float("-inf")), dim=-1)
    return torch.where(mask, logp, torch.zeros_like(logp))


def real_pairs(labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, G, G] bool: (i, j) when both are real candidates of the group and i is graded above j."""
    both = mask[:, :, None] & mask[:, None, :]
    return both & (labels[:, :, None] > labels[:, None, :])
