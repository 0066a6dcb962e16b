"""The IDX parser on files the test writes, and the built-in `fashion` dataset on Debian's files.

The real-file test does not skip: without dataset-fashion-mnist (./run installs it as root) it
fails with the DataError that names the package.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from streamer.engine.data import load_fashion, load_splits, read_idx_images, read_idx_labels
from streamer.errors import DataError


def _write_idx(path: Path, magic: int, dims: tuple[int, ...], payload: bytes) -> Path:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    with gzip.open(path, "wb") as fh:
        fh.write(header + payload)
    return path


def _pair(root: Path, part: str, pixels: np.ndarray, labels: np.ndarray) -> None:
    n, h, w = pixels.shape
    _write_idx(root / f"{part}-images-idx3-ubyte.gz", 0x0803, (n, h, w), pixels.astype(np.uint8).tobytes())
    _write_idx(root / f"{part}-labels-idx1-ubyte.gz", 0x0801, (len(labels),), labels.astype(np.uint8).tobytes())


class TestIdxParser:
    def test_images_and_labels_round_trip(self, tmp_path: Path) -> None:
        """Pixels come back as (N, 1, H, W) float32 value/255 in C order; labels as int64."""
        pixels = np.arange(3 * 2 * 4).reshape(3, 2, 4) * 10 % 256
        _pair(tmp_path, "train", pixels, np.array([9, 0, 4]))
        data = load_fashion("train", tmp_path)
        assert data.x.shape == (3, 1, 2, 4) and data.x.dtype == torch.float32
        assert torch.equal(data.x[:, 0], torch.tensor(pixels, dtype=torch.float32) / 255)
        assert data.y.tolist() == [9, 0, 4] and data.y.dtype == torch.int64

    def test_wrong_magic_is_named(self, tmp_path: Path) -> None:
        """A label file read as images (magic 0801) is a DataError naming the expected magic."""
        path = _write_idx(tmp_path / "x.gz", 0x0801, (2,), b"\x01\x02")
        with pytest.raises(DataError, match="00000803"):
            read_idx_images(path)

    def test_truncated_payload_is_named(self, tmp_path: Path) -> None:
        """A header promising more bytes than the file holds is a DataError with both sizes."""
        path = _write_idx(tmp_path / "y.gz", 0x0801, (5,), b"\x01\x02")
        with pytest.raises(DataError, match="5 labels"):
            read_idx_labels(path)

    def test_images_and_labels_must_agree(self, tmp_path: Path) -> None:
        """3 images with 2 labels is a DataError, not a silent truncation."""
        _pair(tmp_path, "t10k", np.zeros((3, 2, 2)), np.array([1, 2]))
        with pytest.raises(DataError, match="3 images but 2 labels"):
            load_fashion("t10k", tmp_path)

    def test_a_missing_file_names_the_package(self, tmp_path: Path) -> None:
        """No files: the error says how to install them."""
        with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
            load_fashion("train", tmp_path)

    def test_not_gzip_is_a_data_error(self, tmp_path: Path) -> None:
        """A file that is not gzip is a DataError, not an OSError traceback."""
        (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"plain text")
        with pytest.raises(DataError, match="cannot read"):
            load_fashion("train", tmp_path)


def test_fashion_splits_on_the_real_files() -> None:
    """Debian's files: train 59,000 + buffer 1,000 from the 60,000 training images, audit = the
    10,000 test images (1,000 a class), 28x28 in [0, 1]; the split is fixed by its seed."""
    splits = load_splits("fashion")
    assert (len(splits.train), len(splits.buffer), len(splits.audit)) == (59_000, 1_000, 10_000)
    assert splits.audit.x.shape[1:] == (1, 28, 28) and splits.train.x.dtype == torch.float32
    assert 0 <= float(splits.train.x.min()) and float(splits.train.x.max()) <= 1
    assert splits.audit.y.bincount().tolist() == [1000] * 10
    assert torch.equal(load_splits("fashion").buffer.y, splits.buffer.y)
