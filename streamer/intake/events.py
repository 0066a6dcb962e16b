"""Deletion events, schema v1: parse and strictly validate one Kafka record value.

A record's key is its request_id; its value is UTF-8 JSON:

    {"schema": 1, "request_id": "r-1", "label": 3,
     "mode": "misclassify" | "relabel" | "unseen",   # optional: absent = unlearning.default_mode
     "target_label": 5,                       # relabel only, != label
     "sample": {"tensor": {"dtype": "float32" | "uint8", "shape": [C, H, W], "data_b64": "..."}}
             | {"image_b64": "<PNG or JPEG bytes>"}
             | {"uri": "file:///<path under a configured root>"}    # .png .jpg .jpeg .npy .pt
             | {"dataset": "<configured name>", "index": 0},
     "subject": "<optional opaque id, <= 256 chars>", "requested_at": "<optional RFC 3339>"}

Every way an event can be wrong raises `InvalidEvent` with a reason a person can act on; nothing
is resized, clipped or converted between channel counts silently.

The goals (README "Goals"): misclassify = any class but `label` (the paper's); relabel = exactly
`target_label`; unseen = the class a model that never saw the instance gives it, resolved by the
engine when the request is first applied (`engine.unseen`).
"""
from __future__ import annotations

import base64
import json
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import torch

from ..config import REQUEST_MODES
from .goal import Goal
from .samples import DTYPES, FILE_SUFFIXES, InvalidEvent, SampleContext, _is_int, decode_sample  # noqa: F401

SCHEMA_VERSION = 1
MODES = REQUEST_MODES  # misclassify | relabel | unseen
MAX_SUBJECT_CHARS = 256
MAX_JSON_VALUES = 1024  # commas + objects + arrays: an event has ~10, a subject may hold a few hundred commas

_REQUIRED_KEYS = frozenset({"schema", "request_id", "label", "sample"})
_OPTIONAL_KEYS = frozenset({"mode", "target_label", "subject", "requested_at"})
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


@dataclass(frozen=True)
class ForgetRequest:
    """One validated deletion request."""

    request_id: str
    mode: str  # misclassify | relabel | unseen
    label: int  # the instance's original class
    target_label: int | None  # relabel only
    x: torch.Tensor  # (C, H, W) float32 in [0, 1]
    subject: str | None = None
    requested_at: str | None = None
    unseen_class: int | None = None  # unseen only: the class it resolved to when first applied (replay)
    # Where the sample came from, when it names a place a training pipeline can match on:
    # {"dataset": NAME, "index": I} or {"uri": URI}; None for inline pixels (tensor, image_b64)
    sample_ref: Mapping[str, Any] | None = None

    @property
    def goal(self) -> Goal:
        """The request's goal; an unseen one carries its class once resolved (`unseen_class`)."""
        target = self.unseen_class if self.mode == "unseen" else self.target_label
        return Goal(self.mode, self.label, target)


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
    """Best effort: a valid request_id from the JSON value (read as strictly as `parse_event`),
    else from the record key, else None."""
    try:
        event = _load_object(value)
    except InvalidEvent:
        event = None
    if isinstance(event, dict) and (found := _valid_request_id(event.get("request_id"))):
        return found
    if key is not None:
        try:
            return _valid_request_id(key.decode("utf-8"))
        except UnicodeDecodeError:
            return None
    return None


def encode_event(request_id: str, mode: str | None, label: int, x: torch.Tensor,
                 target_label: int | None = None, subject: str | None = None) -> bytes:
    """A schema-v1 event value carrying `x` (C, H, W), pixels in [0, 1], as a float32 tensor sample.
    `mode` None leaves it out (the daemon's unlearning.default_mode applies). Raises ValueError
    for an x that is not 3-dimensional or a mode not in MODES; the rest is `parse_event`'s to check."""
    if x.dim() != 3:
        raise ValueError(f"x must be (C, H, W), got shape {tuple(x.shape)}")
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)} or None, got {mode!r}")
    raw = x.detach().to("cpu", torch.float32).contiguous().numpy().astype(DTYPES["float32"]).tobytes()
    event: dict[str, Any] = {
        "schema": SCHEMA_VERSION, "request_id": request_id, "label": label,
        "sample": {"tensor": {"dtype": "float32", "shape": list(x.shape),
                              "data_b64": base64.b64encode(raw).decode("ascii")}},
    }
    if mode is not None:
        event["mode"] = mode
    if target_label is not None:
        event["target_label"] = target_label
    if subject is not None:
        event["subject"] = subject
    return json.dumps(event, separators=(",", ":")).encode("utf-8")


# --- the event object ------------------------------------------------------------------------


def _load_object(value: bytes) -> dict[str, Any]:
    """The record value as a JSON object, strictly: UTF-8 (RFC 8259 sec. 8.1), no duplicate keys
    (sec. 4 leaves them undefined: we refuse to guess which value was meant), no NaN/Infinity,
    and no string that a UTF-8 store cannot hold or a person cannot see (unpaired surrogates from
    \\uD800-\\uDFFF escapes, control characters). At most MAX_JSON_VALUES values, counted from the
    bytes before parsing: `[{},{},...]` or `["ab","ab",...]` would take 12-24 times the payload."""
    separators = value.count(b",") + value.count(b"{") + value.count(b"[")
    if separators > MAX_JSON_VALUES:
        raise InvalidEvent(f"payload has {separators} JSON commas, objects and arrays, more than the "
                           f"{MAX_JSON_VALUES} allowed (an event has a handful)")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidEvent(f"payload is not UTF-8: {err}") from err
    try:
        event = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except InvalidEvent:
        raise
    except (ValueError, RecursionError) as err:
        raise InvalidEvent(f"payload is not JSON: {err}") from err
    if not isinstance(event, dict):
        raise InvalidEvent(f"payload is a JSON {type(event).__name__}, expected an object")
    return event


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        _check_text(key, "a key")
        if key in seen:
            raise InvalidEvent(f"duplicate key {key!r}: JSON objects must not repeat a key")
        if isinstance(value, str):
            _check_text(value, f"the value of {key!r}")
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, str):
                    _check_text(item, f"an item of {key!r}")
        seen[key] = value
    return seen


def _check_text(text: str, where: str) -> None:
    for char in text:
        kind = unicodedata.category(char)
        if kind == "Cs":
            raise InvalidEvent(f"{where} holds an unpaired UTF-16 surrogate (U+{ord(char):04X}), not text")
        if kind == "Cc":
            raise InvalidEvent(f"{where} holds the control character U+{ord(char):04X}")


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
    mode = ctx.default_mode if event.get("mode") is None else event["mode"]  # null: absent, like the other optional keys
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
        given = f"mode {mode}" if event.get("mode") is not None else f"an event without mode (the default, {mode})"
        raise InvalidEvent(f"{given} takes no target_label (use mode relabel)")

    x = decode_sample(event["sample"], ctx)
    _check_dataset_label(event["sample"], label, ctx)
    return ForgetRequest(
        request_id=request_id, mode=mode, label=label, target_label=target_label, x=x,
        subject=_subject(event.get("subject")), requested_at=_requested_at(event.get("requested_at")),
        sample_ref=_sample_ref(event["sample"]),
    )


def _sample_ref(sample: dict[str, Any]) -> dict[str, Any] | None:
    """The sample's reference for `streamer forgotten` (a decoded, valid sample)."""
    if "dataset" in sample:
        return {"dataset": sample["dataset"], "index": sample["index"]}
    if "uri" in sample:
        return {"uri": sample["uri"]}
    return None


def _check_dataset_label(sample: dict[str, Any], label: int, ctx: SampleContext) -> None:
    """A `{dataset, index}` sample's label must be the one the dataset holds: every goal is judged
    against the trained label (a wrong one makes misclassify 'met' with the model unchanged)."""
    labels = ctx.dataset_labels.get(sample.get("dataset")) if "dataset" in sample else None
    if labels is not None and int(labels[sample["index"]]) != label:
        what = f"label {label} is not the label dataset {sample['dataset']!r} holds for index {sample['index']}"
        why = ": goals are judged against the trained label"
        # the producer is not told the dataset's label; the operator's log and `streamer produce` are
        raise InvalidEvent(what + why, detail=f"{what} ({int(labels[sample['index']])}){why}")


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


