"""Small models and data shared by the engine tests."""
from __future__ import annotations

import torch
from torch import nn

from streamer.engine.models import Normalized


def tiny_model(seed: int = 0, classes: int = 3) -> Normalized:
    """A 2-layer MLP on (B, 1, 4, 4) inputs, wrapped like every streamer model."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, classes))
    return Normalized(net, (0.5,), (0.25,)).eval()


def tiny_data(n: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def constant_classifier(bias: float, shape: tuple[int, ...] = (1, 2, 2), classes: int = 3) -> Normalized:
    """A linear classifier that predicts class 0 for every input of `shape`, by `bias` logits."""
    features = 1
    for size in shape:
        features *= size
    net = nn.Sequential(nn.Flatten(), nn.Linear(features, classes))
    with torch.no_grad():
        net[1].weight.zero_()
        net[1].bias.copy_(torch.tensor([bias] + [0.0] * (classes - 1)))
    return Normalized(net, (0.0,), (1.0,)).eval()
