"""Samples of deletion events: decode a `sample` object into a (C, H, W) float32 tensor in [0, 1].

    {"tensor": {"dtype": "float32" | "uint8", "shape": [C, H, W], "data_b64": "..."}}
    {"image_b64": "<PNG or JPEG bytes>"}       decoded with Pillow
    {"uri": "file:///<path under a configured root>"}    # .png .jpg .jpeg .npy .pt
    {"dataset": "<configured name>", "index": 0}

Every way a sample can be wrong raises `InvalidEvent` with a reason a person can act on; nothing
is resized, clipped or converted between channel counts silently. A `uri` is read by `uri.py`
(opened once, checked on the open file); every decoder bounds what it allocates (`pixels.py`).
"""
from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..config import DEFAULT_MODES
from ..errors import ConfigError
from .invalid import MAX_REASON_CHARS, InvalidEvent, storable_text  # noqa: F401 (re-exported)
from .pixels import DTYPES, check_shape, image_pixels, npy_pixels, pt_pixels, to_pixels
from .uri import FILE_SUFFIXES, read_uri

_SAMPLE_FORMS = (frozenset({"tensor"}), frozenset({"image_b64"}), frozenset({"uri"}),
                 frozenset({"dataset", "index"}))
_TENSOR_KEYS = frozenset({"dtype", "shape", "data_b64"})


__all__ = ["DTYPES", "FILE_SUFFIXES", "InvalidEvent", "SampleContext", "decode_sample", "storable_text"]


@dataclass(frozen=True)
class SampleContext:
    """What a sample is checked against, where `uri` and `dataset` samples may come from, and the
    goal of an event that names none. Raises ConfigError for a value out of range."""

    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W)
    uri_roots: tuple[Path, ...] = ()
    datasets: Mapping[str, torch.Tensor] = field(default_factory=dict)  # name -> (N, C, H, W) in [0, 1]
    dataset_labels: Mapping[str, torch.Tensor] = field(default_factory=dict)  # name -> (N,) the trained labels
    max_payload_bytes: int = 8 * 1024 * 1024  # also caps the size of a file a `uri` points at
    default_mode: str = "misclassify"  # the goal of an event without `mode` (unlearning.default_mode)

    def __post_init__(self) -> None:
        if self.default_mode not in DEFAULT_MODES:
            raise ConfigError(f"default_mode must be one of {', '.join(DEFAULT_MODES)}, got {self.default_mode!r}")
        if self.num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2, got {self.num_classes}")
        if len(self.input_shape) != 3 or any(d < 1 for d in self.input_shape):
            raise ConfigError(f"input_shape must be (C, H, W) of positive ints, got {self.input_shape}")
        if self.max_payload_bytes < 1:
            raise ConfigError(f"max_payload_bytes must be positive, got {self.max_payload_bytes}")
        for name, images in self.datasets.items():
            if images.dim() != 4 or tuple(images.shape[1:]) != tuple(self.input_shape):
                raise ConfigError(
                    f"dataset {name!r} has shape {tuple(images.shape)}, expected (N, {', '.join(map(str, self.input_shape))})"
                )
        for name, labels in self.dataset_labels.items():
            if name not in self.datasets or tuple(labels.shape) != (len(self.datasets[name]),):
                raise ConfigError(f"dataset_labels[{name!r}] must be ({len(self.datasets.get(name, ()))},) "
                                  f"beside its images, got {tuple(labels.shape)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def decode_sample(sample: Any, ctx: SampleContext) -> torch.Tensor:
    """The sample as a fresh (C, H, W) float32 tensor in [0, 1]."""
    if not isinstance(sample, dict) or frozenset(sample) not in _SAMPLE_FORMS:
        keys = sorted(sample) if isinstance(sample, dict) else type(sample).__name__
        raise InvalidEvent(
            "sample must be exactly one of {tensor}, {image_b64}, {uri} or {dataset, index}; "
            f"got {keys}"
        )
    if "tensor" in sample:
        return _tensor_sample(sample["tensor"], ctx)
    if "image_b64" in sample:
        return image_pixels(_b64decode("image_b64", sample["image_b64"]), ctx.input_shape)
    if "uri" in sample:
        return _uri_sample(sample["uri"], ctx)
    return _dataset_sample(sample["dataset"], sample["index"], ctx)


def _b64decode(name: str, value: Any) -> bytes:
    if not isinstance(value, str):
        raise InvalidEvent(f"{name} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as err:
        raise InvalidEvent(f"{name} is not valid base64: {err}") from err


def _tensor_sample(tensor: Any, ctx: SampleContext) -> torch.Tensor:
    if not isinstance(tensor, dict) or frozenset(tensor) != _TENSOR_KEYS:
        raise InvalidEvent("sample.tensor must be an object with exactly dtype, shape and data_b64")
    dtype = tensor["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise InvalidEvent(f"tensor dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    shape = tensor["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise InvalidEvent(f"tensor shape must be a list of integers, got {shape!r}")
    check_shape(tuple(shape), ctx.input_shape)  # before decoding: the data must be exactly this size
    raw = _b64decode("tensor data_b64", tensor["data_b64"])
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if len(raw) != expected:
        raise InvalidEvent(f"tensor data is {len(raw)} bytes, expected {expected} for {dtype} {shape}")
    return to_pixels(np.frombuffer(raw, dtype=DTYPES[dtype]).reshape(shape), ctx.input_shape)


def _uri_sample(uri: Any, ctx: SampleContext) -> torch.Tensor:
    """The file `uri` names, read once inside the roots (intake/uri.py), decoded within bounds (pixels.py)."""
    data, suffix = read_uri(uri, ctx.uri_roots, ctx.max_payload_bytes)
    decode = image_pixels if suffix in (".png", ".jpg", ".jpeg") else npy_pixels if suffix == ".npy" else pt_pixels
    try:
        return decode(data, ctx.input_shape)
    except InvalidEvent as err:
        raise InvalidEvent(f"{uri}: {err.reason}", detail=f"{uri}: {err.detail}") from err


def _dataset_sample(name: Any, index: Any, ctx: SampleContext) -> torch.Tensor:
    if not isinstance(name, str) or name not in ctx.datasets:
        known = ", ".join(sorted(ctx.datasets)) or "none configured"
        raise InvalidEvent(f"unknown dataset {name!r}; known: {known}")
    images = ctx.datasets[name]
    if not _is_int(index):
        raise InvalidEvent(f"dataset index must be an integer, got {index!r}")
    if not 0 <= index < len(images):
        raise InvalidEvent(f"dataset index {index} is outside [0, {len(images)}) for {name!r}")
    return images[index].to(torch.float32).clone()  # (C, H, W); owned, so later edits don't alias
