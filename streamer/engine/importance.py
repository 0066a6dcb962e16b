"""MAS weight importance on the instances to forget (the paper's Eq. 2 / Alg. 2) and the
IMP regulariser built from it.

Omega_i = mean_x |d ||f(x)||_2^2 / d theta_i|, min-max normalised per tensor to [0, 1];
the penalty is sum_i (1 - Omega_i) (theta_i - theta_old_i)^2: the weights that matter for the
instances to forget may move, the others are held at their values at the start of the fragment.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import Interrupted


def mas_importance(model: nn.Module, x: torch.Tensor, batch_size: int = 64,
                   should_stop: Callable[[], bool] | None = None) -> dict[str, torch.Tensor]:
    """Per-parameter importance in [0, 1]. A constant tensor (e.g. gradients all zero) maps to
    0, i.e. "unimportant for the forget set, hold it", never NaN. Model mode is restored.

    x: (N, C, H, W). Raises `Interrupted` within one sample of `should_stop()` turning true."""
    was_training = model.training
    model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    try:
        for i in range(0, len(x), batch_size):
            chunk = x[i : i + batch_size]
            for xi in chunk.split(1):  # per-sample |grad|, as in MAS: abs before the mean
                if should_stop is not None and should_stop():
                    raise Interrupted("stop requested during the importance computation")
                out = model(xi)
                grads = torch.autograd.grad(out.pow(2).sum(), list(params.values()), allow_unused=True)
                for (name, _), g in zip(params.items(), grads):
                    if g is not None:
                        total[name] += g.abs()
    finally:
        model.train(was_training)
    return {n: _minmax(t / max(len(x), 1)) for n, t in total.items()}


def _minmax(t: torch.Tensor) -> torch.Tensor:
    lo, hi = t.min(), t.max()
    span = hi - lo
    if not torch.isfinite(span) or span <= 0:
        return torch.zeros_like(t)
    return (t - lo) / span


class ImportancePenalty:
    """Owns the anchor parameters and the importance; `penalty(model)` is Eq. 7's regulariser."""

    def __init__(self, model: nn.Module, importance: dict[str, torch.Tensor]):
        self.anchor = {n: p.detach().clone() for n, p in model.named_parameters() if n in importance}
        self.hold = {n: 1.0 - omega for n, omega in importance.items()}

    def penalty(self, model: nn.Module) -> torch.Tensor:
        terms = [
            (self.hold[n] * (p - self.anchor[n]).pow(2)).sum()
            for n, p in model.named_parameters()
            if n in self.hold
        ]
        return torch.stack(terms).sum() if terms else torch.zeros(())
