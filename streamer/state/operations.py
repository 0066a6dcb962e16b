"""Operator requests to a running daemon: rollback and rebase between fragments.

While the daemon runs it owns the checkpoint directory (an flock on LOCK), so `streamer rollback`
and `streamer rebase` leave `<dir>/<KIND>.request.json` (KIND: ROLLBACK or REBASE); the daemon
takes it between fragments, carries it out and answers in `<dir>/<KIND>.result.json`, which the
command waits for. Each request has a random id, so a stale answer is never taken for a new one.

No path leaves the directory through a request: the files a request needs (a rebase's weights
and exclusion list) are copied into the directory first, as `<KIND>.<id>.<key>`, and the request
names only those copies, which the daemon reads by name (`staged_file`). Every file here is the
owner's alone (0600), created exclusively under a fresh name and renamed into place, and none is
read through a symlink.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import StreamerError
from .durable import PRIVATE_FILE, TEMP_PREFIX, read_file, write_atomic

KINDS = ("ROLLBACK", "REBASE")
MAX_REQUEST_BYTES = 65_536
_STAGED = re.compile(r"(ROLLBACK|REBASE)\.[0-9a-f]{32}\.[a-z_]+")

__all__ = ["KINDS", "OperationRefused", "OperationTimeout", "answer_request", "remove_stale_staged",
           "request_via_daemon", "staged_file", "take_request"]


class OperationTimeout(StreamerError):
    """The daemon did not answer in time (it runs requests between fragments)."""


class OperationRefused(StreamerError):
    """A request names a file that is not one the command staged in the directory: refuse it."""


def request_via_daemon(root: Path, kind: str, payload: dict[str, Any], timeout_s: float,
                       files: Mapping[str, Path] = {}) -> dict:
    """Leave a `kind` request for the running daemon and wait for its answer; `files` (payload
    key -> a file of the caller's) are copied into the directory and the payload names the copies.
    Raises OperationTimeout when no answer comes within timeout_s, OSError when a file cannot be
    copied."""
    request_id = uuid.uuid4().hex
    result = root / f"{kind}.result.json"
    result.unlink(missing_ok=True)
    staged = {key: _stage(root, f"{kind}.{request_id}.{key}", source) for key, source in files.items()}
    write_atomic(root / f"{kind}.request.json", json.dumps({**payload, **staged, "id": request_id}).encode())
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        answer = _read_json(result)
        if answer is not None and answer.get("id") == request_id:
            for name in staged.values():
                (root / name).unlink(missing_ok=True)
            return answer
        time.sleep(0.5)
    raise OperationTimeout(f"the daemon did not answer the {kind.lower()} request within {timeout_s:.0f} s "
                           f"(it runs it between fragments); {root / f'{kind}.request.json'} is still pending")


def take_request(root: Path, kind: str) -> dict | None:
    """The daemon's side: a pending `kind` request, removed from the directory, or None (an
    unreadable one, or a symlink in its place, comes back as {"id": None})."""
    path = root / f"{kind}.request.json"
    if not os.path.lexists(path):
        return None
    request = _read_json(path)
    path.unlink(missing_ok=True)
    return request if request is not None else {"id": None}


def staged_file(root: Path, kind: str, request: Mapping[str, Any], key: str) -> Path:
    """The file `request` names under `key`: a copy the command staged in `root` for this very
    request (`<KIND>.<id>.<key>`), a regular file and not a symlink. Raises OperationRefused for
    anything else (a path, another request's file, a link)."""
    name = request.get(key)
    expected = f"{kind}.{request.get('id')}.{key}"
    if not isinstance(name, str) or name != expected or not _STAGED.fullmatch(name):
        raise OperationRefused(f"the {kind.lower()} request's {key} is not a file staged in the checkpoint "
                               "directory by `streamer`: refused")
    path = root / name
    if path.is_symlink() or not path.is_file():
        raise OperationRefused(f"the {kind.lower()} request's {key} is missing or not a regular file: refused")
    return path


def answer_request(root: Path, kind: str, request: dict, answer: dict) -> None:
    """Write the answer (atomically, owner-only) and remove the files staged for the request."""
    write_atomic(root / f"{kind}.result.json", json.dumps({**answer, "id": request.get("id")}).encode())
    request_id = request.get("id")
    if isinstance(request_id, str) and re.fullmatch(r"[0-9a-f]{32}", request_id):
        for staged in root.glob(f"{kind}.{request_id}.*"):
            staged.unlink(missing_ok=True)


def remove_stale_staged(root: Path) -> list[str]:
    """Writer start-up: remove staged files no pending request names (their request was carried
    out, or the daemon stopped while carrying it out: the command was answered or timed out)."""
    pending = {str(r.get("id")) for kind in KINDS if (r := _read_json(root / f"{kind}.request.json")) is not None}
    stale = [p for p in root.glob("*.*.*") if _STAGED.fullmatch(p.name) and p.name.split(".")[1] not in pending]
    for path in stale:
        path.unlink(missing_ok=True)
    return sorted(p.name for p in stale)


def _stage(root: Path, name: str, source: Path) -> str:
    """Copy `source` to `root/name`, created exclusively, owner-only, fsynced; returns `name`."""
    temp = root / f"{TEMP_PREFIX}{name}"
    with open(source, "rb") as src:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE)
        try:
            with os.fdopen(fd, "wb") as dst:
                shutil.copyfileobj(src, dst)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(temp, root / name)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
    return name


def _read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None (missing, a symlink, too large, not a JSON object)."""
    try:
        value = json.loads(read_file(path, limit=MAX_REQUEST_BYTES).decode("utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
