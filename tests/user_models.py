"""A user's own classifier and the files a user brings: `factory:user_models:build` in a config.

The network is the user's class (not streamer's reference CNN), with BatchNorm and a
normalisation the user configures; `write_source` saves it the ways the ecosystem does, and
`user_load` is the one-liner a serving stack uses on a published version.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from streamer.engine.data import load_splits
from streamer.engine.models import Normalized
from streamer.engine.train import fit

MEAN, STD = (0.3,), (0.4,)
SHAPE = (1, 8, 8)
# input kind -> the format the daemon publishes when model.format is auto
INPUTS = {"state_dict": "state_dict", "dataparallel": "state_dict", "lightning": "state_dict",
          "compiled": "state_dict", "torchscript": "torchscript", "export": "export"}


class UserDigitsNet(nn.Module):
    """(B, 1, 8, 8) normalised digits -> (B, num_classes) logits: Conv-BN-ReLU-pool, two Linear layers."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.MaxPool2d(2))  # (B, width, 4, 4)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(width * 16, 32), nn.ReLU(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build(num_classes: int = 10, width: int = 16) -> UserDigitsNet:
    """The factory a config names: `factory:user_models:build`."""
    return UserDigitsNet(num_classes, width)


def trained_net(epochs: int = 6, seed: int = 0) -> UserDigitsNet:
    """The user's net trained briefly on digits (a few seconds; BatchNorm statistics non-trivial)."""
    torch.manual_seed(seed)
    net = build()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit(Normalized(net, MEAN, STD), load_splits("digits").train, epochs, seed=seed)
    finally:
        torch.set_num_threads(threads)
    return net.eval()


def write_source(net: nn.Module, kind: str, directory: Path) -> dict[str, Any]:
    """Save `net` as a user would for input `kind` (see INPUTS); the model section of a config for it."""
    directory.mkdir(parents=True, exist_ok=True)
    state = net.state_dict()
    common = {"num_classes": 10, "input_shape": list(SHAPE), "mean": list(MEAN), "std": list(STD)}
    if kind in ("torchscript", "export"):
        path = directory / ("user.ts" if kind == "torchscript" else "user.pt2")
        if kind == "torchscript":
            torch.jit.script(net.eval()).save(str(path))
        else:
            batch = torch.export.Dim("batch", min=1)
            program = torch.export.export(net.eval(), (torch.rand(2, *SHAPE),), dynamic_shapes=({0: batch},))
            torch.export.save(program, path)
        return {**common, "source": f"{kind}:{path}", "weights": None}
    saved: object = {
        "state_dict": state,
        "dataparallel": nn.DataParallel(net).state_dict(),  # every key under 'module.'
        "lightning": {"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3, "global_step": 84,
                      "pytorch-lightning_version": "2.4.0", "hyper_parameters": {"lr": 1e-3}},
        "compiled": torch.compile(net).state_dict(),  # every key under '_orig_mod.'
    }[kind]
    path = directory / f"user-{kind}.ckpt"
    torch.save(saved, path)
    return {**common, "source": "factory:user_models:build", "weights": str(path)}


def user_load(path: Path, fmt: str) -> nn.Module:
    """What the user's serving stack writes to load a published model file, one line per format."""
    if fmt == "state_dict":
        net = UserDigitsNet()
        net.load_state_dict(torch.load(path, weights_only=True))  # strict
        return net.eval()
    if fmt == "torchscript":
        return torch.jit.load(path)
    return torch.export.load(path).module()


def predict_logits(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, 10) logits of the user's net on (N, 1, 8, 8) pixels in [0, 1], normalised as configured."""
    with torch.no_grad():
        return net((x - torch.tensor(MEAN).view(1, -1, 1, 1)) / torch.tensor(STD).view(1, -1, 1, 1))
