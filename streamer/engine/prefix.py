"""The frozen prefix of a network: the layers before the first one unlearning moves.

While a fragment runs in eval mode, the prefix's output for a fixed input never changes, so
the engine computes it once per fragment (for the objective, the adversarial examples, the
distillation pool, the retain buffer) and runs only the trainable suffix per step. Only an
eager `nn.Sequential` (forward not overridden) is split, at a top-level child; anything else
(TorchScript, torch.export, a custom forward) returns None: the engine then runs the whole model.
"""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import nn

from .models import Normalized

__all__ = ["FrozenPrefix", "frozen_prefix_length", "split_frozen_prefix"]


def frozen_prefix_length(net: nn.Module, trainable: Collection[str]) -> int | None:
    """How many leading top-level children of `net` hold no parameter named in `trainable`
    (names as `net.named_parameters()` gives them); None when `net` cannot be split there (not
    an eager nn.Sequential, or one whose forward is its own)."""
    if (not isinstance(net, nn.Sequential) or isinstance(net, (torch.jit.ScriptModule, torch.fx.GraphModule))
            or type(net).forward is not nn.Sequential.forward):
        return None
    chosen = set(trainable)
    for i, (name, child) in enumerate(net.named_children()):
        if any(f"{name}.{p}" in chosen for p, _ in child.named_parameters()):
            return i
    return len(net)


@dataclass(frozen=True)
class FrozenPrefix:
    """model(x) == suffix(prefix(x)); `prefix` holds no trainable parameter."""

    prefix: nn.Module  # pixels in [0, 1] -> features (normalisation included)
    suffix: nn.Module  # features -> logits
    length: int  # top-level children of the user's network in the prefix

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) prefix output, without gradients. x: (N, C, H, W)."""
        return self.prefix(x)


def split_frozen_prefix(model: nn.Module, trainable: Collection[str]) -> FrozenPrefix | None:
    """The split of `model` (the user's network, or it inside `Normalized`) at its first
    trainable child; None when it cannot be split or the prefix is empty (nothing to cache)."""
    net = model.net if isinstance(model, Normalized) else model
    length = frozen_prefix_length(net, trainable)
    if not length:
        return None
    children = list(net.children())
    head = nn.Sequential(*children[:length])
    prefix = _NormalizedPrefix(head, model.mean, model.std) if isinstance(model, Normalized) else head
    return FrozenPrefix(prefix, nn.Sequential(*children[length:]), length)


class _NormalizedPrefix(nn.Module):
    """Normalized's (x - mean) / std, then the first layers: the same arithmetic as the model's."""

    def __init__(self, head: nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.head = head
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((x - self.mean) / self.std)
