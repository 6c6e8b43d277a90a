"""Matryoshka re-ranker losses (SPEC 7): listwise CE and distillation summed over exits."""

from __future__ import annotations

import torch

from .distillation import distillation
from .listwise import listwise_ce

SELF_DISTILL_METHODS = ("teacher", "final_layer", "cascade", "fixed_interval")


def self_distill_teachers(exits: list[int], method: str, interval: int = 8) -> dict[int, int]:
    """{student exit: teacher exit} for the exits below the top.

    Going down from the top exit e_0 > e_1 > ...: `teacher` (data only): none; `final_layer`: e_0;
    `cascade`: the exit just above; `fixed_interval`: the teacher is refreshed every `interval`
    exits (e_1..e_8 learn from e_0, e_9..e_16 from e_8, ...: FlagEmbedding's `fix_layer`).
    """
    if method not in SELF_DISTILL_METHODS:
        raise ValueError(f"self-distillation method must be one of {SELF_DISTILL_METHODS}, got {method!r}")
    if interval < 1:
        raise ValueError(f"fixed_interval needs interval >= 1, got {interval}")
    down = sorted(exits, reverse=True)
    if method == "teacher":
        return {}
    if method == "final_layer":
        return {e: down[0] for e in down[1:]}
    if method == "cascade":
        return {e: down[i - 1] for i, e in enumerate(down) if i > 0}
    return {e: down[interval * ((i - 1) // interval)] for i, e in enumerate(down) if i > 0}


def matryoshka_loss(scores: dict[int, torch.Tensor], teacher_scores: torch.Tensor | None = None,
                    self_teacher: dict[int, torch.Tensor] | None = None, teachers: dict[int, int] | None = None,
                    distill_weight: float = 1.0, self_distill_weight: float = 1.0,
                    temperature: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """sum over exits l of CE(s_l) + w KD(t, s_l) + w' KD(f_m, s_l), all [B, G] (SPEC 7).

    `self_teacher[m]` are the (detached) scores of exit m from an uncompressed pass; `teachers`
    maps a student exit to its teacher exit m (see `self_distill_teachers`).
    Returns the total and its three parts.
    """
    zero = next(iter(scores.values())).new_zeros((), dtype=torch.float32)
    ce, kd_data, kd_self = zero, zero, zero
    for layer, s in scores.items():
        ce = ce + listwise_ce(s)
        if teacher_scores is not None and distill_weight:
            kd_data = kd_data + distillation(teacher_scores, s, temperature)
        if teachers and self_teacher is not None and layer in teachers:
            kd_self = kd_self + distillation(self_teacher[teachers[layer]].detach(), s)
    total = ce + distill_weight * kd_data + self_distill_weight * kd_self
    return total, {"ce": ce, "distill": kd_data, "self_distill": kd_self}
