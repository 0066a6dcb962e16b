"""Loss terms of the unlearning objectives (pure tensor functions).

`target` encodes the request per instance: -1 = misclassify (move away from `y`),
c >= 0 = relabel to class c. The "goal gap" is positive while an instance misses its goal.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MISCLASSIFY = -1


def goal_gap(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N,) logit margin by which each instance misses its goal (> 0: goal not met, < 0: met).
    misclassify: z_y - max_{j != y} z_j;  relabel: max_{j != t} z_j - z_t."""
    relabel = target >= 0
    own = torch.where(relabel, target, y)  # the class whose logit matters
    z_own = logits.gather(1, own[:, None]).squeeze(1)
    others = logits.scatter(1, own[:, None], float("-inf")).amax(1)
    return torch.where(relabel, others - z_own, z_own - others)


def goal_met(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the prediction is not y (misclassify) or is the target (relabel). A row with a
    NaN/Inf logit meets no goal: its argmax says nothing about what the model predicts."""
    pred = logits.argmax(1)
    met = torch.where(target >= 0, pred == target, pred != y)
    return met & torch.isfinite(logits).all(1)


def forget_loss(kind: str, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor, margin: float) -> torch.Tensor:
    """(N,) per-instance forgetting loss.
    neg_ce: Eq. 3 for misclassify (-CE to y), Eq. 4 for relabel (CE to t) -- unbounded for -CE;
    margin: relu(gap + margin). -CE's gradient on z_y is -(1 - p_y), which vanishes on a
    confident model (p_y -> 1) and whose value is unbounded once the instance is wrong; the
    margin's gradient is +-1 on the two logits until the instance is past its goal by `margin`,
    then exactly zero, so forgotten instances stop pulling the model."""
    if kind == "margin":
        return F.relu(goal_gap(logits, y, target) + margin)
    if kind == "neg_ce":
        relabel = target >= 0
        ce_y = F.cross_entropy(logits, y, reduction="none")
        ce_t = F.cross_entropy(logits, target.clamp_min(0), reduction="none")
        return torch.where(relabel, ce_t, -ce_y)
    raise ValueError(f"unknown forget loss {kind!r}; expected 'margin' or 'neg_ce'")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) at temperature T, scaled by T^2 (Hinton et al.)."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean", log_target=True,
    ) * t * t
