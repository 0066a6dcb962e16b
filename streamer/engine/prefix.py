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

import copy

import torch
from torch import nn

from .models import Normalized

__all__ = ["FrozenPrefix", "cpu_channels_last", "frozen_prefix_length", "split_frozen_prefix"]


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
    def features(self, x: torch.Tensor, chunk: int = 128) -> torch.Tensor:
        """(N, ...) prefix output, without gradients. x: (N, C, H, W). Computed `chunk` images at a
        time: measured on the MNIST-5k CNN (2,048 images, 2 threads, channels-last), 128 keeps a
        chunk's activations in cache: 0.16 s, 0.30 s with 512, 0.37 s in one batch."""
        return torch.cat([self.prefix(c) for c in x.split(chunk)]) if len(x) > chunk else self.prefix(x)


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


def cpu_channels_last(module: nn.Module) -> nn.Module:
    """A channels-last copy of an eager CPU module that has 4-D (convolution) weights, for the
    fragment's fixed-weight passes (the attack, the frozen prefix): the same values, another
    memory layout, so the same arithmetic up to summation order. Measured on the MNIST-5k CNN, 2
    threads: the prefix of 2,048 images in 0.16 s instead of 0.31 s, the attack 1.27x faster
    (max-pooling with indices is the gain). `module` itself on other devices (not measured there),
    for TorchScript or torch.export modules, with forward hooks (a copy would call them with
    its own modules), and without 4-D weights."""
    params = list(module.parameters())
    if (not params or params[0].device.type != "cpu" or not any(p.dim() == 4 for p in params)
            or any(isinstance(m, (torch.jit.ScriptModule, torch.fx.GraphModule)) or m._forward_hooks
                   or m._forward_pre_hooks for m in module.modules())):
        return module
    try:
        return copy.deepcopy(module).to(memory_format=torch.channels_last)
    except Exception:  # a layout is only a speed-up: a module that cannot be copied is used as it is
        return module
