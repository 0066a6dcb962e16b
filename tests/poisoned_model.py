"""A user's `factory:` model with input-dependent failures, for the failure-policy tests.

The digits reference CNN (same parameter names, so the trained weights load), except that its
forward raises on an all-ones image (as a user's assertion, or a CUDA out-of-memory on one large
input, would) and returns NaN logits for an all-0.5 image.
"""
from __future__ import annotations

import torch
from torch import nn

from streamer.engine.models import digits_cnn


class Poisoned(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1, 8, 8)
        flat = x.flatten(1)
        if bool((flat == 1.0).all(1).any()):
            raise RuntimeError("poisoned input: an all-ones image")
        out = super().forward(x)
        nan_rows = ((flat - 0.5).abs() < 1e-6).all(1, keepdim=True)
        return torch.where(nan_rows, torch.full_like(out, float("nan")), out)


def build(num_classes: int = 10) -> nn.Module:
    return Poisoned(*digits_cnn(num_classes))
