"""What the daemon writes to Kafka: receipts, dead letters and checkpoint records (pure encoders).

    receipts topic     key request_id  {"schema": 1, "request_id", "status", "applied", "version",
                                        "reason", "completed_at"} (+ "mode", "target_class" when the request
                                        was read: its goal, and the class it sends the instance to)
    dead-letter topic  key as received {"schema": 1, "reason", "request_id", "topic", "partition",
                                        "offset", "key_bytes", "value_bytes", "key_sha256", "value_sha256",
                                        "key_b64", "value_b64" (null unless opted in), "payload",
                                        "rejected_at"}
                                        (+ headers streamer.reason, streamer.source)
    checkpoints topic  key version     {"schema": 1, "version", "parent", "path", "model_path",
                                        "model_format", "sha256", "created_at", "requests", "metrics"}
"""
from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

from ..state import Manifest, RequestOutcome

SCHEMA = 1
DEAD_LETTER_MAX_BYTES = 1_048_576 - 16_384  # kafka-python's default max_request_size, less headroom
MAX_KEY_BYTES = 1024

__all__ = ["checkpoint_record", "dead_letter", "receipt"]


def receipt(outcome: RequestOutcome) -> tuple[bytes, bytes]:
    """(key, value) of the receipt for an outcome that has a request_id. `applied` tells a `failed`
    request that is in the model (its goal missed at the cap; the daemon keeps working on it) from
    one that never was (re-send it). An outcome that knows its
    request's mode adds "mode" and "target_class" (relabel: target_label; unseen: the class the
    instance now goes to, null until applied; misclassify: null). Raises ValueError without a request_id."""
    if outcome.request_id is None:
        raise ValueError("an outcome without a request_id gets no receipt")
    value = {"schema": SCHEMA, "request_id": outcome.request_id, "status": outcome.status,
             "applied": outcome.applied, "version": outcome.version, "reason": outcome.reason,
             "completed_at": outcome.completed_at}
    if outcome.mode is not None:
        value.update(mode=outcome.mode, target_class=outcome.target_class)
    return outcome.request_id.encode("utf-8"), _json(value)


def dead_letter(reason: str, request_id: str | None, topic: str, partition: int, offset: int,
                key: bytes | None, value: bytes | None, rejected_at: str, include_payload: bool = False,
                max_bytes: int = DEAD_LETTER_MAX_BYTES) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]]:
    """(key, value, headers) of a dead letter: why, where the record was, its sizes and sha256.

    The raw payload (which may hold the very image someone asked to have forgotten) is copied
    only with `include_payload`, and only while the dead letter stays under `max_bytes` (the
    producer's record size limit, less headroom): a dead letter is always deliverable."""
    body: dict[str, Any] = {
        "schema": SCHEMA, "reason": reason, "request_id": request_id, "topic": topic, "partition": partition,
        "offset": offset, "key_bytes": _size(key), "value_bytes": _size(value), "key_sha256": _sha256(key),
        "value_sha256": _sha256(value), "key_b64": None, "value_b64": None, "payload": "omitted",
        "rejected_at": rejected_at,
    }
    if include_payload:
        body.update(key_b64=_b64(key), value_b64=_b64(value), payload="included")
        if len(_json(body)) > max_bytes:
            body.update(key_b64=None, value_b64=None, payload=f"omitted: over the {max_bytes}-byte dead-letter limit")
    headers = [("streamer.reason", reason.encode("utf-8")[:1024]),
               ("streamer.source", f"{topic}/{partition}/{offset}".encode("utf-8"))]
    dl_key = key if key is not None and len(key) <= MAX_KEY_BYTES else (request_id or "").encode("utf-8") or None
    return dl_key, _json(body), headers


def checkpoint_record(manifest: Manifest, directory: Path) -> tuple[bytes, bytes]:
    """(key, value) announcing a published version so serving systems can hot-reload it."""
    value = {
        "schema": SCHEMA, "version": manifest.version, "parent": manifest.parent, "path": str(directory),
        "model_path": str(directory / manifest.model_file), "model_format": manifest.model_format,
        "sha256": manifest.model_sha256,
        "created_at": manifest.created_at, "requests": len(manifest.requests), "metrics": dict(manifest.metrics),
    }
    return manifest.version.encode("ascii"), _json(value)


def _size(data: bytes | None) -> int | None:
    return None if data is None else len(data)


def _sha256(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=False).encode("utf-8")
