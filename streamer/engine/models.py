"""Classifiers: reference CNNs for the offline datasets and loaders for users' models.

Every model streamer works with takes pixels in [0, 1]; mean/std normalisation lives inside
`Normalized`, so attacks and the pixel-range projection work in pixel space.
"""
from __future__ import annotations

import importlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError


class Normalized(nn.Module):
    """(x - mean) / std in front of a network; x is (B, C, H, W) in [0, 1]."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


@contextmanager
def grad_only(model: nn.Module, params=(), *, train: bool = False):
    """Within the block: `model.train(train)` and only `params` require gradients (none by
    default, as for an attack on the inputs). Afterwards the model's mode and every parameter's
    requires_grad flag are as they were, even on an exception."""
    chosen = {id(p) for p in params}
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.train(train)
    for p, _ in flags:
        p.requires_grad_(id(p) in chosen)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def digits_cnn(num_classes: int = 10) -> nn.Module:
    """~53k parameters, flatten head, for (B, 1, 8, 8)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 64, 4, 4)
        nn.Flatten(), nn.Linear(64 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, num_classes),
    )


def mnist_cnn(num_classes: int = 10) -> nn.Module:
    """~422k parameters, flatten head, for (B, 1, 28, 28)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, 14, 14)
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 64, 7, 7)
        nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, num_classes),
    )


REFERENCE = {"digits": digits_cnn, "mnist5k": mnist_cnn}
REFERENCE_INPUT = {"digits": (1, 8, 8), "mnist5k": (1, 28, 28)}


@dataclass(frozen=True)
class ModelConfig:
    """How to build the classifier. `source` is one of:
    `reference:digits` / `reference:mnist5k` (built-in CNNs), `torchvision:<arch>`
    (e.g. `torchvision:resnet18`), `torchscript:<path>`, or `factory:<module>:<function>`
    (called with num_classes). `weights` is a state_dict file (required except for TorchScript).
    """

    source: str = "reference:digits"
    weights: str | None = None
    num_classes: int = 10
    input_shape: tuple[int, int, int] = (1, 8, 8)
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)


def build_network(cfg: ModelConfig) -> nn.Module:
    kind, _, rest = cfg.source.partition(":")
    if kind == "reference":
        if rest not in REFERENCE:
            raise ModelLoadError(f"unknown reference model {rest!r}; known: {', '.join(REFERENCE)}")
        return REFERENCE[rest](cfg.num_classes)
    if kind == "torchvision":
        import torchvision

        try:
            return torchvision.models.get_model(rest, weights=None, num_classes=cfg.num_classes)
        except ValueError as err:
            raise ModelLoadError(f"unknown torchvision architecture {rest!r}") from err
    if kind == "factory":
        module_name, _, fn_name = rest.rpartition(":")
        try:
            fn = getattr(importlib.import_module(module_name), fn_name)
        except (ImportError, AttributeError, ValueError) as err:
            raise ModelLoadError(f"cannot import factory {rest!r}: {err}") from err
        return fn(num_classes=cfg.num_classes)
    raise ModelLoadError(
        f"model.source {cfg.source!r}: expected reference:NAME, torchvision:ARCH, torchscript:PATH or factory:MODULE:FUNCTION"
    )


def load_model(cfg: ModelConfig, device: torch.device | str = "cpu", require_weights: bool = True) -> nn.Module:
    """The configured classifier, weights loaded, wrapped in `Normalized`, in eval mode.
    `require_weights=False` builds the architecture only (a checkpoint's state_dict follows)."""
    if cfg.source.startswith("torchscript:"):
        path = cfg.source.split(":", 1)[1]
        try:
            net = torch.jit.load(path, map_location="cpu")
        except (RuntimeError, ValueError, OSError) as err:
            raise ModelLoadError(f"cannot load TorchScript model {path}: {err}") from err
    else:
        net = build_network(cfg)
    model = Normalized(net, cfg.mean, cfg.std)
    if cfg.weights is not None:
        load_weights(model, cfg.weights)
    elif require_weights and not cfg.source.startswith("torchscript:"):
        raise ModelLoadError("model.weights is required (a state_dict file) for a non-TorchScript model")
    return model.to(device).eval()


def load_weights(model: Normalized, path: str | Path) -> None:
    """Accepts a state_dict of the wrapper (keys `net.*`) or of the bare network."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as err:
        raise ModelLoadError(f"cannot read weights {path}: {err}") from err
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path} holds a {type(state).__name__}, expected a state_dict")
    if not any(key.startswith("net.") for key in state):
        state = {**{f"net.{k}": v for k, v in state.items()}, "mean": model.mean, "std": model.std}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ModelLoadError(f"weights {path} do not fit the configured model: {err}") from err
