"""Operator requests to a running daemon: rollback and rebase between fragments.

While the daemon runs it owns the checkpoint directory (an flock on LOCK), so `streamer rollback`
and `streamer rebase` leave `<dir>/<KIND>.request.json` (KIND: ROLLBACK or REBASE); the daemon
takes it between fragments, carries it out and answers in `<dir>/<KIND>.result.json`, which the
command waits for. Each request has an id, so a stale answer is never taken for a new one.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from ..errors import StreamerError

KINDS = ("ROLLBACK", "REBASE")

__all__ = ["KINDS", "OperationTimeout", "answer_request", "request_via_daemon", "take_request"]


class OperationTimeout(StreamerError):
    """The daemon did not answer in time (it runs requests between fragments)."""


def request_via_daemon(root: Path, kind: str, payload: dict[str, Any], timeout_s: float) -> dict:
    """Leave a `kind` request for the running daemon and wait for its answer. Raises
    OperationTimeout when none comes within timeout_s."""
    result = root / f"{kind}.result.json"
    result.unlink(missing_ok=True)
    request_id = f"{os.getpid()}-{time.time_ns()}"
    temp = root / f".{kind}.request.json.tmp"
    temp.write_text(json.dumps({"id": request_id, **payload}))
    os.replace(temp, root / f"{kind}.request.json")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result.exists():
            answer = json.loads(result.read_text())
            if answer.get("id") == request_id:
                return answer
        time.sleep(0.5)
    raise OperationTimeout(f"the daemon did not answer the {kind.lower()} request within {timeout_s:.0f} s "
                           f"(it runs it between fragments); {root / f'{kind}.request.json'} is still pending")


def take_request(root: Path, kind: str) -> dict | None:
    """The daemon's side: a pending `kind` request, removed from the directory, or None (an
    unreadable one comes back as {"id": None})."""
    path = root / f"{kind}.request.json"
    if not path.exists():
        return None
    try:
        request = json.loads(path.read_text())
    except (OSError, ValueError):
        request = {"id": None}
    path.unlink(missing_ok=True)
    return request if isinstance(request, dict) else {"id": None}


def answer_request(root: Path, kind: str, request: dict, answer: dict) -> None:
    temp = root / f".{kind}.result.json.tmp"
    temp.write_text(json.dumps({"id": request.get("id"), **answer}))
    os.replace(temp, root / f"{kind}.result.json")
