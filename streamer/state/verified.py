"""`<version>/verified.json`: the last `streamer verify` of a version, written by the command, read
by the publish targets that move their alias only to a verified version (`alias_after_verify`).

    {"version": "v000007", "ok": true, "at": RFC 3339, "checked": 12, "came_back": 0,
     "unverifiable": 0, "audit_accuracy": 0.91}

Beside the manifest, not in it: a published manifest never changes, so a serving stack's copy of
it stays equal to the local one. Written atomically; the latest verify wins.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .durable import fsync_dir, pretty_json, write_atomic

VERIFIED_FILE = "verified.json"

__all__ = ["VERIFIED_FILE", "read_verification", "record_verification"]


def record_verification(version_dir: Path, entry: dict[str, Any]) -> None:
    """Write `entry` as `version_dir/verified.json` (atomic, fsynced). Raises OSError."""
    write_atomic(version_dir / VERIFIED_FILE, pretty_json(entry))
    fsync_dir(version_dir)


def read_verification(version_dir: Path) -> dict[str, Any] | None:
    """The recorded verification, or None when there is none or it is unreadable (not verified)."""
    try:
        data = json.loads((version_dir / VERIFIED_FILE).read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
