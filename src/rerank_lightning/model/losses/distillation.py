"""Distillation from teacher scores (`pos_scores`/`neg_scores`, SPEC 1); NaN marks an unknown score."""

from __future__ import annotations

import torch

from .groups import group_mask, masked_log_softmax


def _known_groups(teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] bool: groups whose real candidates all have a teacher score."""
    return ~(torch.isnan(teacher) & mask).any(dim=-1)


def distillation(teacher: torch.Tensor, scores: torch.Tensor, temperature: float = 1.0,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """-mean_b sum_j softmax(t_b/T)_j log softmax(s_b/T)_j over groups whose teacher scores are all known."""
    mask = group_mask(scores, mask)
    known = _known_groups(teacher, mask)
    if not known.any():
        return scores.new_zeros((), dtype=torch.float32)
    teacher = torch.nan_to_num(teacher[known].detach().float())  # targets, never trained
    target = masked_log_softmax(teacher / temperature, mask[known]).exp() * mask[known]
    log_probs = masked_log_softmax(scores[known].float() / temperature, mask[known])
    return -(target * log_probs).sum(-1).mean()


def margin_mse(teacher: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Margin-MSE (Hofstätter et al. 2020): the mean over (group, real negative j) of
    ((s_0 - s_j) - (t_0 - t_j))^2, column 0 the positive, over groups whose teacher scores are known."""
    mask = group_mask(scores, mask)
    known = _known_groups(teacher, mask)
    negatives = mask[known, 1:]
    if not negatives.any():
        return scores.new_zeros((), dtype=torch.float32)
    t = torch.nan_to_num(teacher[known].detach().float())
    s = scores[known].float()
    gap = (s[:, :1] - s[:, 1:]) - (t[:, :1] - t[:, 1:])
    return gap[negatives].pow(2).mean()
