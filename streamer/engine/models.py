"""Classifiers: reference CNNs for the offline datasets and loaders for users' models.

Every model streamer works with takes pixels in [0, 1]; mean/std normalisation lives inside
`Normalized` (from the config, never in a published file), so attacks and the pixel-range
projection work in pixel space. The user's network is `Normalized.net`; versions publish it
alone, in the user's format (see `formats`).
"""
from __future__ import annotations

import importlib
import io
from collections import OrderedDict
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from ..errors import ModelLoadError
from .formats import load_user_model_bytes, load_weights_file, unwrap_state_dict


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


class BasicBlock(nn.Module):
    """He et al. (CVPR 2016) basic residual block: two 3x3 conv + BatchNorm, identity or 1x1
    projection shortcut. (B, cin, H, W) -> (B, cout, ceil(H / stride), ceil(W / stride))."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout else
                         nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def fashion_resnet(num_classes: int = 10) -> nn.Module:
    """A small ResNet for (B, 1, 28, 28): stem 16, then one basic block per stage at 32/64/128
    channels, each halving the resolution (28 -> 14 -> 7 -> 4), global average pool, `fc`.
    ~290k parameters, ~9.5M multiply-adds per image. Top-level children are named (stem,
    layer1..3, pool, flatten, fc) so `trainable` globs such as ["layer3.*", "fc.*"] read as
    torchvision's do, and the frozen prefix splits at a stage."""
    return nn.Sequential(OrderedDict(
        stem=nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()),
        layer1=BasicBlock(16, 32, 2), layer2=BasicBlock(32, 64, 2), layer3=BasicBlock(64, 128, 2),
        pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(128, num_classes),
    ))


REFERENCE = {"digits": digits_cnn, "mnist5k": mnist_cnn, "fashion": fashion_resnet}
REFERENCE_INPUT = {"digits": (1, 8, 8), "mnist5k": (1, 28, 28), "fashion": (1, 28, 28)}


@dataclass(frozen=True)
class ModelConfig:
    """How to build the classifier. `source` is one of:
    `reference:digits` / `reference:mnist5k` (built-in CNNs), `torchvision:<arch>`
    (e.g. `torchvision:resnet18`), `factory:<module>:<function>` (called with num_classes and
    `kwargs`), `torchscript:<path>` or `export:<path>` (a torch.export `.pt2` file). `weights`
    is a state_dict file (required for the first three). `format` is the format versions are
    published in: `auto` (the source's: see `source_format`), `state_dict`, `torchscript`, `export`.
    """

    source: str = "reference:digits"
    weights: str | None = None
    num_classes: int = 10
    input_shape: tuple[int, int, int] = (1, 8, 8)
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    format: str = "auto"
    kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    training_set_size: int | None = None  # optional: instances the model was trained on ("retrain advised")

    @property
    def model_format(self) -> str:
        """The format every version's model file is written in."""
        return source_format(self.source) if self.format == "auto" else self.format


def source_format(source: str) -> str:
    """The format a model source arrives in: torchscript:, export:, else state_dict."""
    kind = source.partition(":")[0]
    return kind if kind in ("torchscript", "export") else "state_dict"


def build_network(cfg: ModelConfig) -> nn.Module:
    """The architecture a reference:, torchvision: or factory: source names, freshly initialised."""
    kind, _, rest = cfg.source.partition(":")
    if kind == "reference":
        if rest not in REFERENCE:
            raise ModelLoadError(f"unknown reference model {rest!r}; known: {', '.join(REFERENCE)}")
        return REFERENCE[rest](cfg.num_classes)
    if kind == "torchvision":
        import torchvision

        try:
            return torchvision.models.get_model(rest, weights=None, num_classes=cfg.num_classes, **cfg.kwargs)
        except ValueError as err:
            raise ModelLoadError(f"unknown torchvision architecture {rest!r}") from err
    if kind == "factory":
        module_name, _, fn_name = rest.rpartition(":")
        try:
            fn = getattr(importlib.import_module(module_name), fn_name)
        except (ImportError, AttributeError, ValueError) as err:
            raise ModelLoadError(f"cannot import factory {rest!r}: {err}") from err
        try:
            return fn(num_classes=cfg.num_classes, **cfg.kwargs)
        except TypeError as err:
            raise ModelLoadError(f"factory {rest!r} refuses its arguments (model.kwargs?): {err}") from err
    raise ModelLoadError(f"model.source {cfg.source!r}: expected reference:NAME, torchvision:ARCH, "
                         "factory:MODULE:FUNCTION, torchscript:PATH or export:PATH")


def source_network(cfg: ModelConfig) -> nn.Module:
    """The user's network as the source gives it, on the CPU, before `cfg.weights`: the
    TorchScript or exported file, or the architecture built from code. Raises ModelLoadError."""
    fmt = source_format(cfg.source)
    if fmt == "state_dict":
        return build_network(cfg)
    path = cfg.source.split(":", 1)[1]
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ModelLoadError(f"cannot read model file {path}: {err.strerror or err}") from err
    try:
        return load_user_model_bytes(data, fmt)
    except ModelLoadError as err:
        raise ModelLoadError(f"{path}: {err}") from err


def load_model(cfg: ModelConfig, device: torch.device | str = "cpu", require_weights: bool = True) -> Normalized:
    """The configured classifier wrapped in `Normalized`, in eval mode, with `cfg.weights` loaded
    strictly (see `load_net_state`). `require_weights=False` accepts a model built from code
    without weights (a checkpoint's weights follow). Raises a one-line ModelLoadError."""
    model = Normalized(source_network(cfg), cfg.mean, cfg.std)
    if cfg.weights is not None:
        load_weights(model, cfg.weights)
    elif require_weights and source_format(cfg.source) == "state_dict":
        raise ModelLoadError("model.weights is required (a state_dict file) for a model built from code")
    return model.to(device).eval()


def published_model(cfg: ModelConfig, data: bytes, fmt: str, device: torch.device | str = "cpu") -> Normalized:
    """A published model file loaded as its user loads it (a state_dict into the configured
    class, TorchScript with torch.jit.load, .pt2 with torch.export.load), wrapped with the
    configured normalisation, in eval mode. Raises ModelLoadError."""
    if fmt == "state_dict":
        model = Normalized(source_network(cfg), cfg.mean, cfg.std)
        load_net_state(model, load_weights_file(io.BytesIO(data)), where="the model file")
    else:
        model = Normalized(load_user_model_bytes(data, fmt), cfg.mean, cfg.std)
    return model.to(device).eval()


def split_normalized_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor] | None:
    """(the network's state, mean, std) when `state` is a state_dict of the `Normalized` wrapper
    (keys `net.*`, `mean`, `std`: checkpoints written before versions held the user's format,
    or weights saved from the wrapper); None for any other state_dict."""
    if not {"mean", "std"} <= state.keys() or not all(k.startswith("net.") for k in state if k not in ("mean", "std")):
        return None
    return {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}, state["mean"], state["std"]


def load_net_state(target: nn.Module, state: object, where: str | Path = "the weights") -> None:
    """Load `state` strictly into the user's network, in place. `target` is the network or its
    `Normalized` wrapper; `state` a state_dict of either (a wrapper's mean/std must equal the
    configured ones), possibly prefixed or wrapped as `formats.unwrap_state_dict` accepts.
    Raises a one-line ModelLoadError naming `where`."""
    net = target.net if isinstance(target, Normalized) else target
    expected = net.state_dict()
    # A network whose own keys are net.*, mean and std (a wrapper of its own) is loaded as it is.
    if isinstance(state, Mapping) and state.keys() != expected.keys() and (split := split_normalized_state(state)):
        state, mean, std = split
        if isinstance(target, Normalized) and not (
                _same_values(mean, target.mean) and _same_values(std, target.std)):
            raise ModelLoadError(f"{where} was saved with mean {mean.flatten().tolist()} / std {std.flatten().tolist()}, "
                                 f"but model.mean / model.std are {target.mean.flatten().tolist()} / "
                                 f"{target.std.flatten().tolist()}: set them to the saved values")
    try:
        net.load_state_dict(unwrap_state_dict(state, expected))
    except ModelLoadError as err:
        raise ModelLoadError(f"{where}: {err}") from err


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a weights file (see `load_net_state`) into `model`, in place."""
    load_net_state(model, load_weights_file(path), where=str(path))


def _same_values(saved: torch.Tensor, configured: torch.Tensor) -> bool:
    return saved.shape == configured.shape and torch.allclose(saved.cpu(), configured.cpu())
