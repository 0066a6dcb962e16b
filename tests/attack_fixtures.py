"""Small cases for the forgetting attacks (engine.verification, engine.probes), shared by their tests.

Learnable case: Gaussian clusters in 64 pixels whose class is linearly separable (class c lights up
pixels 16c..16c+15), and a small MLP `Flatten, Linear, ReLU, Linear` trained on them.
"""
from __future__ import annotations

import torch
from torch import nn

K = 4


def mlp(d_in: int = 64, hidden: int = 256) -> nn.Module:
    """(B, 1, 8, 8) -> (B, K): a two-Linear head on the flattened pixels."""
    return nn.Sequential(nn.Flatten(), nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, K))


def fit(net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float = 3e-3) -> nn.Module:
    """Full-batch Adam for `steps`; returns `net` in eval mode."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def clusters(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 1, 8, 8) separable images and their (n,) classes."""
    y = torch.randint(K, (n,), generator=gen)
    centres = torch.eye(K).repeat_interleave(16, 1)  # (K, 64): class c lights up pixels 16c..16c+15
    return (0.5 * centres[y] + 0.4 * torch.rand(n, 64, generator=gen)).view(n, 1, 8, 8), y


def learnable_case(net: nn.Module | None = None):
    """(trained net, (forget x, y) 60, (held-out x, y) 300); `net` defaults to mlp(hidden=32)."""
    gen = torch.Generator().manual_seed(1)
    train_x, train_y = clusters(300, gen)
    forget_x, forget_y = clusters(60, gen)
    held_x, held_y = clusters(300, gen)
    torch.manual_seed(1)
    trained = fit(net if net is not None else mlp(hidden=32), train_x, train_y, 200)
    return trained, (forget_x, forget_y), (held_x, held_y)
