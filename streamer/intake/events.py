"""Deletion events, schema v1: parse and strictly validate one Kafka record value.

A record's key is its request_id; its value is UTF-8 JSON:

    {"schema": 1, "request_id": "r-1", "mode": "misclassify" | "relabel", "label": 3,
     "target_label": 5,                       # relabel only, != label
     "sample": {"tensor": {"dtype": "float32" | "uint8", "shape": [C, H, W], "data_b64": "..."}}
             | {"image_b64": "<PNG or JPEG bytes>"}
             | {"uri": "file:///<path under a configured root>"}    # .png .jpg .jpeg .npy .pt
             | {"dataset": "<configured name>", "index": 0},
     "subject": "<optional opaque id, <= 256 chars>", "requested_at": "<optional RFC 3339>"}

Every way an event can be wrong raises `InvalidEvent` with a reason a person can act on; nothing
is resized, clipped or converted between channel counts silently.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import unquote, urlsplit

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError, StreamerError

SCHEMA_VERSION = 1
MODES = ("misclassify", "relabel")
DTYPES = {"float32": np.dtype("<f4"), "uint8": np.dtype("u1")}  # raw tensor bytes are little-endian
FILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".npy", ".pt")
MAX_SUBJECT_CHARS = 256

_REQUIRED_KEYS = frozenset({"schema", "request_id", "mode", "label", "sample"})
_OPTIONAL_KEYS = frozenset({"target_label", "subject", "requested_at"})
_SAMPLE_FORMS = (frozenset({"tensor"}), frozenset({"image_b64"}), frozenset({"uri"}),
                 frozenset({"dataset", "index"}))
_TENSOR_KEYS = frozenset({"dtype", "shape", "data_b64"})
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")
# Single-band modes for C == 1, colour modes for C == 3; anything else (alpha, 16-bit, CMYK)
# would need a lossy or ambiguous conversion, so it is rejected instead.
_IMAGE_MODES = {1: ("1", "L"), 3: ("RGB", "P", "YCbCr")}


class InvalidEvent(StreamerError):
    """The event cannot be processed as sent: dead-letter it and emit a `rejected` receipt.

    `request_id` is the event's id when it could be read (else None); `reason` says what is wrong.
    """

    def __init__(self, reason: str, request_id: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.request_id = request_id


@dataclass(frozen=True)
class ForgetRequest:
    """One validated deletion request."""

    request_id: str
    mode: str  # misclassify | relabel
    label: int  # the instance's original class
    target_label: int | None  # relabel only
    x: torch.Tensor  # (C, H, W) float32 in [0, 1]
    subject: str | None = None
    requested_at: str | None = None

    @property
    def target(self) -> int:
        """The class to move the instance to; -1 means "any class but `label`" (misclassify)."""
        return -1 if self.target_label is None else self.target_label


@dataclass(frozen=True)
class SampleContext:
    """What a sample is checked against and where `uri` and `dataset` samples may come from."""

    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W)
    uri_roots: tuple[Path, ...] = ()
    datasets: Mapping[str, torch.Tensor] = field(default_factory=dict)  # name -> (N, C, H, W) in [0, 1]
    max_payload_bytes: int = 8 * 1024 * 1024  # also caps the size of a file a `uri` points at

    def __post_init__(self) -> None:
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


def parse_event(value: bytes, ctx: SampleContext) -> ForgetRequest:
    """The validated request in a record value; raises InvalidEvent saying what is wrong."""
    if len(value) > ctx.max_payload_bytes:
        raise InvalidEvent(f"payload is {len(value)} bytes, more than the {ctx.max_payload_bytes} allowed")
    event = _load_object(value)
    request_id = _valid_request_id(event.get("request_id"))
    try:
        return _parse_object(event, ctx)
    except InvalidEvent as err:
        err.request_id = request_id
        raise


def request_id_of(value: bytes, key: bytes | None) -> str | None:
    """Best effort: a valid request_id from the JSON value, else from the record key, else None."""
    try:
        event = json.loads(value)
    except (ValueError, TypeError, RecursionError):
        event = None
    if isinstance(event, dict) and (found := _valid_request_id(event.get("request_id"))):
        return found
    if key is not None:
        try:
            return _valid_request_id(key.decode("utf-8"))
        except UnicodeDecodeError:
            return None
    return None


def encode_event(request_id: str, mode: str, label: int, x: torch.Tensor,
                 target_label: int | None = None, subject: str | None = None) -> bytes:
    """A schema-v1 event value carrying `x` (C, H, W), pixels in [0, 1], as a float32 tensor sample."""
    if x.dim() != 3:
        raise ValueError(f"x must be (C, H, W), got shape {tuple(x.shape)}")
    raw = x.detach().to("cpu", torch.float32).contiguous().numpy().astype(DTYPES["float32"]).tobytes()
    event: dict[str, Any] = {
        "schema": SCHEMA_VERSION, "request_id": request_id, "mode": mode, "label": label,
        "sample": {"tensor": {"dtype": "float32", "shape": list(x.shape),
                              "data_b64": base64.b64encode(raw).decode("ascii")}},
    }
    if target_label is not None:
        event["target_label"] = target_label
    if subject is not None:
        event["subject"] = subject
    return json.dumps(event, separators=(",", ":")).encode("utf-8")


# --- the event object ------------------------------------------------------------------------


def _load_object(value: bytes) -> dict[str, Any]:
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidEvent(f"payload is not UTF-8: {err}") from err
    try:
        event = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as err:
        raise InvalidEvent(f"payload is not JSON: {err}") from err
    if not isinstance(event, dict):
        raise InvalidEvent(f"payload is a JSON {type(event).__name__}, expected an object")
    return event


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _parse_object(event: dict[str, Any], ctx: SampleContext) -> ForgetRequest:
    if "schema" not in event:
        raise InvalidEvent("missing key 'schema'")
    if not _is_int(event["schema"]) or event["schema"] != SCHEMA_VERSION:
        raise InvalidEvent(f"unknown schema {event['schema']!r}, expected {SCHEMA_VERSION}")
    missing = sorted(_REQUIRED_KEYS - event.keys())
    if missing:
        raise InvalidEvent(f"missing key(s) {', '.join(missing)}")
    extra = sorted(event.keys() - _REQUIRED_KEYS - _OPTIONAL_KEYS)
    if extra:
        raise InvalidEvent(f"unknown key(s) {', '.join(extra)}")

    request_id = _valid_request_id(event["request_id"])
    if request_id is None:
        raise InvalidEvent(f"request_id must be 1-128 characters of A-Z a-z 0-9 . _ : -, got {event['request_id']!r}")
    mode = event["mode"]
    if mode not in MODES:
        raise InvalidEvent(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    label = _class_index("label", event["label"], ctx.num_classes)
    target_label = event.get("target_label")
    if mode == "relabel":
        if target_label is None:
            raise InvalidEvent("mode relabel needs a target_label")
        target_label = _class_index("target_label", target_label, ctx.num_classes)
        if target_label == label:
            raise InvalidEvent(f"target_label equals label ({label}): relabelling must change the class")
    elif target_label is not None:
        raise InvalidEvent("mode misclassify takes no target_label (use mode relabel)")

    return ForgetRequest(
        request_id=request_id, mode=mode, label=label, target_label=target_label,
        x=_parse_sample(event["sample"], ctx),
        subject=_subject(event.get("subject")), requested_at=_requested_at(event.get("requested_at")),
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _valid_request_id(value: Any) -> str | None:
    return value if isinstance(value, str) and _REQUEST_ID.fullmatch(value) else None


def _class_index(name: str, value: Any, num_classes: int) -> int:
    if not _is_int(value):
        raise InvalidEvent(f"{name} must be an integer, got {value!r}")
    if not 0 <= value < num_classes:
        raise InvalidEvent(f"{name} {value} is outside [0, {num_classes})")
    return value


def _subject(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_SUBJECT_CHARS:
        raise InvalidEvent(f"subject must be a string of at most {MAX_SUBJECT_CHARS} characters")
    return value


def _requested_at(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidEvent(f"requested_at must be an RFC 3339 string, got {value!r}")
    bad = InvalidEvent(f"requested_at {value!r} is not an RFC 3339 date-time (e.g. 2024-05-01T12:00:00Z)")
    if not _RFC3339.fullmatch(value):
        raise bad
    try:
        datetime.fromisoformat(re.sub(r"[Zz]$", "+00:00", value))
    except ValueError as err:
        raise bad from err
    return value


# --- samples ---------------------------------------------------------------------------------


def _parse_sample(sample: Any, ctx: SampleContext) -> torch.Tensor:
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
