"""Samples of deletion events: decode a `sample` object into a (C, H, W) float32 tensor in [0, 1].

    {"tensor": {"dtype": "float32" | "uint8", "shape": [C, H, W], "data_b64": "..."}}
    {"image_b64": "<PNG or JPEG bytes>"}       decoded with Pillow
    {"uri": "file:///<path under a configured root>"}    # .png .jpg .jpeg .npy .pt
    {"dataset": "<configured name>", "index": 0}

Every way a sample can be wrong raises `InvalidEvent` with a reason a person can act on; nothing
is resized, clipped or converted between channel counts silently.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import unquote, urlsplit

import numpy as np
import torch
from PIL import Image

from ..config import DEFAULT_MODES
from ..errors import ConfigError, StreamerError

DTYPES = {"float32": np.dtype("<f4"), "uint8": np.dtype("u1")}  # raw tensor bytes are little-endian
FILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".npy", ".pt")
MAX_REASON_CHARS = 1000  # a reason quotes event content: bounded, so dead letters and ledger rows stay small
_SAMPLE_FORMS = (frozenset({"tensor"}), frozenset({"image_b64"}), frozenset({"uri"}),
                 frozenset({"dataset", "index"}))
_TENSOR_KEYS = frozenset({"dtype", "shape", "data_b64"})
# Single-band modes for C == 1, colour modes for C == 3; anything else (alpha, 16-bit, CMYK)
# would need a lossy or ambiguous conversion, so it is rejected instead.
_IMAGE_MODES = {1: ("1", "L"), 3: ("RGB", "P", "YCbCr")}


__all__ = ["DTYPES", "FILE_SUFFIXES", "InvalidEvent", "SampleContext", "decode_sample", "storable_text"]


def storable_text(text: str) -> str:
    """`text` with unpaired surrogates and non-printable characters written as Python escapes
    (\\ud83d, \\x00): any UTF-8 store (SQLite, Kafka, JSON logs) takes the result."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class InvalidEvent(StreamerError):
    """The event cannot be processed as sent: dead-letter it and emit a `rejected` receipt.

    `request_id` is the event's id when it could be read (else None); `reason` says what is wrong.
    """

    def __init__(self, reason: str, request_id: str | None = None):
        reason = storable_text(reason if len(reason) <= MAX_REASON_CHARS else
                               f"{reason[:MAX_REASON_CHARS]}... ({len(reason)} characters)")
        super().__init__(reason)
        self.reason = reason
        self.request_id = request_id


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
        return _image_pixels(_b64decode("image_b64", sample["image_b64"]), ctx)
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
    _check_shape(tuple(shape), ctx)
    raw = _b64decode("tensor data_b64", tensor["data_b64"])
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if len(raw) != expected:
        raise InvalidEvent(f"tensor data is {len(raw)} bytes, expected {expected} for {dtype} {shape}")
    return _to_pixels(np.frombuffer(raw, dtype=DTYPES[dtype]).reshape(shape), ctx)


def _check_shape(shape: tuple[int, ...], ctx: SampleContext) -> None:
    if shape != tuple(ctx.input_shape):
        raise InvalidEvent(f"sample shape {list(shape)} does not match the model's input shape {list(ctx.input_shape)}")


def _to_pixels(array: np.ndarray, ctx: SampleContext) -> torch.Tensor:
    """float32 must already be finite and in [0, 1]; uint8 is scaled by 1/255."""
    _check_shape(tuple(array.shape), ctx)
    if array.dtype == np.uint8:
        return torch.from_numpy(array.astype(np.float32) / 255.0)
    if array.dtype != np.float32:
        raise InvalidEvent(f"sample dtype {array.dtype} is not allowed; use float32 or uint8")
    if not np.isfinite(array).all():
        raise InvalidEvent("sample has NaN or infinite values")
    if array.size and (array.min() < 0.0 or array.max() > 1.0):
        raise InvalidEvent(f"float32 sample values must lie in [0, 1], got [{array.min()}, {array.max()}]")
    return torch.from_numpy(array.astype(np.float32, order="C", copy=True))


def _image_pixels(data: bytes, ctx: SampleContext) -> torch.Tensor:
    channels, height, width = ctx.input_shape
    if channels not in _IMAGE_MODES:
        raise InvalidEvent(f"image samples need a model with 1 or 3 input channels, not {channels}")
    try:
        with Image.open(io.BytesIO(data), formats=["PNG", "JPEG"]) as image:
            # Size is read from the header: reject before decoding pixels (also stops bombs).
            if image.size != (width, height):
                raise InvalidEvent(
                    f"image is {image.size[0]}x{image.size[1]} (WxH), expected {width}x{height}; "
                    "streamer does not resize"
                )
            if image.mode not in _IMAGE_MODES[channels]:
                raise InvalidEvent(
                    f"image mode {image.mode} does not match {channels} input channel(s); "
                    f"expected one of {', '.join(_IMAGE_MODES[channels])}"
                )
            image.load()
            pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    except InvalidEvent:
        raise
    except Exception as err:  # untrusted bytes: whatever the decoder raises is a rejection, not a crash
        raise InvalidEvent(f"image cannot be decoded as PNG or JPEG: {err}") from err
    if channels == 1:
        pixels = pixels[np.newaxis]  # (1, H, W)
    else:
        pixels = np.ascontiguousarray(pixels.transpose(2, 0, 1))  # (H, W, 3) -> (3, H, W)
    return _to_pixels(pixels, ctx)


def _uri_sample(uri: Any, ctx: SampleContext) -> torch.Tensor:
    path = _resolve_uri(uri, ctx)
    size = path.stat().st_size
    if size > ctx.max_payload_bytes:
        raise InvalidEvent(f"file {uri} is {size} bytes, more than the {ctx.max_payload_bytes} allowed")
    suffix = path.suffix.lower()
    if suffix in (".png", ".jpg", ".jpeg"):
        return _image_pixels(path.read_bytes(), ctx)
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except Exception as err:  # untrusted file: ValueError, EOFError, even tokenize.TokenError
            raise InvalidEvent(f"{uri} is not a plain .npy array: {err}") from err
        if not isinstance(array, np.ndarray):  # an .npz archive under a .npy name
            array.close()
            raise InvalidEvent(f"{uri} does not hold a single array")
        return _to_pixels(array, ctx)
    try:
        tensor = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # untrusted file: UnpicklingError, RuntimeError, EOFError, ...
        raise InvalidEvent(f"{uri} cannot be loaded as a tensor with weights_only=True: {err}") from err
    if not isinstance(tensor, torch.Tensor):
        raise InvalidEvent(f"{uri} holds a {type(tensor).__name__}, expected a tensor")
    if tensor.dtype not in (torch.float32, torch.uint8):
        raise InvalidEvent(f"sample dtype {tensor.dtype} is not allowed; use float32 or uint8")
    return _to_pixels(tensor.detach().contiguous().numpy(), ctx)


def _resolve_uri(uri: Any, ctx: SampleContext) -> Path:
    """The real path a file:// uri names, if it lies inside a uri root and is a supported file."""
    if not isinstance(uri, str):
        raise InvalidEvent(f"uri must be a string, got {uri!r}")
    parts = urlsplit(uri)
    if parts.scheme != "file":
        raise InvalidEvent(f"uri scheme must be file, got {parts.scheme or 'none'!r}")
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise InvalidEvent(f"uri must be file:///ABSOLUTE/PATH with no host, query or fragment, got {uri!r}")
    # realpath resolves `..` and every symlink, so a link inside a root that points out is caught.
    real = os.path.realpath(unquote(parts.path))
    roots = [os.path.realpath(root) for root in ctx.uri_roots]
    if not any(os.path.commonpath([real, root]) == root for root in roots):
        raise InvalidEvent(f"uri {uri} resolves to {real}, which is outside the allowed roots")
    suffix = Path(real).suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise InvalidEvent(f"uri file type {suffix or '(none)'!r} is not supported; use {', '.join(FILE_SUFFIXES)}")
    if not os.path.isfile(real):
        raise InvalidEvent(f"uri {uri}: file not found")
    return Path(real)


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
