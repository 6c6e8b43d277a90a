"""Training objectives (SPEC 6); all computed in fp32 whatever the model's dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def listwise_ce(scores: torch.Tensor) -> torch.Tensor:
    """-mean_b log softmax(s_b)[0]: the positive is column 0 of each [B, G] row."""
    return -F.log_softmax(scores.float(), dim=-1)[:, 0].mean()


def pointwise_ce(logits: torch.Tensor, label_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the Yes/No label token over the full vocabulary at the labelled position."""
    return F.cross_entropy(logits.float(), label_ids)


def distillation(teacher: torch.Tensor, scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """-mean_b sum_j softmax(t_b/T)_j log softmax(s_b/T)_j over groups whose teacher scores are all known."""
    known = ~torch.isnan(teacher).any(dim=-1)
    if not known.any():
        return scores.new_zeros((), dtype=torch.float32)
    target = F.softmax(teacher[known].float() / temperature, dim=-1)
    log_probs = F.log_softmax(scores[known].float() / temperature, dim=-1)
    return -(target * log_probs).sum(-1).mean()
