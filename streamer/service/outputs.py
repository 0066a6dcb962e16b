"""What the daemon writes to Kafka: receipts, dead letters and checkpoint records (pure encoders).

    receipts topic     key request_id  {"schema": 1, "request_id", "status", "version", "reason",
                                        "completed_at"}
    dead-letter topic  key as received {"schema": 1, "reason", "request_id", "topic", "partition",
                                        "offset", "key_b64", "value_b64", "rejected_at"}
                                        (+ headers streamer.reason, streamer.source)
    checkpoints topic  key version     {"schema": 1, "version", "parent", "path", "model_path",
                                        "model_format", "sha256", "created_at", "requests", "metrics"}
"""
from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from ..state.checkpoints import Manifest
from ..state.ledger import Outcome

SCHEMA = 1

__all__ = ["checkpoint_record", "dead_letter", "receipt"]


def receipt(outcome: Outcome) -> tuple[bytes, bytes]:
    """(key, value) of the receipt for an outcome that has a request_id."""
    if outcome.request_id is None:
        raise ValueError("an outcome without a request_id gets no receipt")
    value = {"schema": SCHEMA, "request_id": outcome.request_id, "status": outcome.status,
             "version": outcome.version, "reason": outcome.reason, "completed_at": outcome.completed_at}
    return outcome.request_id.encode("utf-8"), _json(value)


def dead_letter(reason: str, request_id: str | None, topic: str, partition: int, offset: int,
                key: bytes | None, value: bytes | None, rejected_at: str) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]]:
    """(key, value, headers) of a dead letter: the original bytes, base64, and why."""
    body = {
        "schema": SCHEMA, "reason": reason, "request_id": request_id, "topic": topic, "partition": partition,
        "offset": offset, "key_b64": _b64(key), "value_b64": _b64(value), "rejected_at": rejected_at,
    }
    headers = [("streamer.reason", reason.encode("utf-8")),
               ("streamer.source", f"{topic}/{partition}/{offset}".encode("utf-8"))]
    return key, _json(body), headers


def checkpoint_record(manifest: Manifest, directory: Path) -> tuple[bytes, bytes]:
    """(key, value) announcing a published version so serving systems can hot-reload it."""
    value = {
        "schema": SCHEMA, "version": manifest.version, "parent": manifest.parent, "path": str(directory),
        "model_path": str(directory / manifest.model_file), "model_format": manifest.model_format,
        "sha256": manifest.model_sha256,
        "created_at": manifest.created_at, "requests": len(manifest.requests), "metrics": dict(manifest.metrics),
    }
    return manifest.version.encode("ascii"), _json(value)


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=False).encode("utf-8")
