"""Accuracy of a model on labelled sets, and the goal rate of a set of requests."""
from __future__ import annotations

import torch
from torch import nn



@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """(N,) predicted classes; the model's mode is restored. x may live on any device."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        preds = [model(x[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction predicted as y; NaN for an empty set."""
    if len(y) == 0:
        return float("nan")
    return float((predict(model, x) == y.cpu()).float().mean())


def goal_mask(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N,) bool per request: misclassified (target -1), or predicted as its target class."""
    pred, target = predict(model, x), target.cpu()
    return torch.where(target >= 0, pred == target, pred != y.cpu())


def goal_ratio(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of requests whose goal holds; NaN for an empty set."""
    if len(y) == 0:
        return float("nan")
    return float(goal_mask(model, x, y, target).float().mean())
