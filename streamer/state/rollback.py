"""Rollback with replay: history stays append-only and nobody is silently un-forgotten.

`streamer rollback --to V` publishes a NEW version whose weights, forgotten set and consumed
offsets are V's (parent V, so CURRENT's lineage no longer holds the versions after V), marks every
request those versions applied `rolled_back` in the ledger, and the daemon then re-consumes from
V's offsets: each such request is applied again and gets a new receipt naming the new version.
If the topic no longer holds a record to replay (retention), rollback refuses and names the
requests, unless forced: then they are recorded `rolled_back` with that reason and not replayed.

While the daemon runs it owns the checkpoint directory (an flock on LOCK): the command then
leaves a request file that the daemon carries out between fragments and answers in a result
file. When the daemon is stopped the command does the same work itself.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..engine.models import split_normalized_state
from .checkpoints import CheckpointStore, Manifest, rfc3339
from ..errors import StreamerError
from .ledger import Ledger, Outcome

REQUEST_FILE = "ROLLBACK.request.json"
RESULT_FILE = "ROLLBACK.result.json"

Earliest = Callable[[str, int], int]  # (topic, partition) -> first offset the topic still holds


class RollbackRefused(StreamerError):
    """The rollback cannot be done as asked; the message says why and what to do."""


@dataclass(frozen=True)
class RollbackPlan:
    to: Manifest
    current: Manifest
    replay: tuple[Outcome, ...]  # applied after `to`, record still in the topic: applied again
    lost: tuple[Outcome, ...]  # applied after `to`, record gone (retention): cannot be replayed


def plan_rollback(store: CheckpointStore, to_version: str, earliest: Earliest) -> RollbackPlan:
    """What rolling CURRENT back to `to_version` would replay, from the manifests (the source of truth)."""
    current_version = store.current_version()
    if current_version is None:
        raise RollbackRefused(f"no version in {store.root}: nothing to roll back")
    lineage = store.lineage(current_version)
    names = [m.version for m in lineage]
    if to_version == current_version:
        raise RollbackRefused(f"{to_version} is CURRENT already")
    if to_version not in names:
        raise RollbackRefused(f"{to_version} is not an ancestor of CURRENT {current_version} "
                              f"(lineage: {' <- '.join(names)}); rolling to it would skip requests")
    after = lineage[: names.index(to_version)]  # newest first, the versions being undone
    applied = [Outcome.from_json({**r, "version": m.version, "completed_at": m.created_at})
               for m in reversed(after) for r in m.requests]
    lost = tuple(o for o in applied if o.offset < earliest(o.topic, o.partition))
    replay = tuple(o for o in applied if o not in lost)
    return RollbackPlan(to=lineage[names.index(to_version)], current=lineage[0], replay=replay, lost=lost)


def apply_rollback(store: CheckpointStore, ledger: Ledger, plan: RollbackPlan, force: bool,
                   clock: Callable[[], float] = time.time) -> Manifest:
    """Publish the new version (V's state, parent V) and record the rolled-back requests."""
    if plan.lost and not force:
        raise RollbackRefused(
            f"the topic no longer holds {len(plan.lost)} records to replay after {plan.to.version} (retention); "
            f"these requests could not be applied again: {', '.join(sorted(str(o.request_id) for o in plan.lost))}. "
            "Re-send them, or use --force to record them as rolled_back")
    checkpoint = store.load(plan.to.version)
    metrics = {**plan.to.metrics, "rollback_to": plan.to.version, "rolled_back_from": plan.current.version,
               "replayed_requests": len(plan.replay), "lost_requests": len(plan.lost)}
    # V's model file byte for byte (same format, same sha256); a V from before formats holds the
    # Normalized wrapper's keys, so its weights are republished with the user's keys instead.
    legacy = None if plan.to.format_recorded else split_normalized_state(checkpoint.state_dict)
    model = legacy[0] if legacy is not None else checkpoint.model or checkpoint.state_dict
    manifest = store.publish(plan.to.version, model, checkpoint.forgotten,
                             offsets=plan.to.offsets, metrics=metrics)
    now = rfc3339(clock())
    ledger.append([_rolled_back(o, manifest.version, now, "replayed from its record")
                   for o in plan.replay] +
                  [_rolled_back(o, manifest.version, now, "NOT replayed: the record is gone (retention), --force")
                   for o in plan.lost])
    return manifest


def _rolled_back(o: Outcome, new_version: str, now: str, how: str) -> Outcome:
    return Outcome(status="rolled_back", request_id=o.request_id, version=o.version,
                   reason=f"rollback {new_version} undid {o.version}; {how}", topic=o.topic,
                   partition=o.partition, offset=o.offset, subject=o.subject, completed_at=now)


def request_via_daemon(root: Path, to_version: str, force: bool, timeout_s: float) -> dict:
    """Leave a rollback request for the running daemon and wait for its answer."""
    result = root / RESULT_FILE
    result.unlink(missing_ok=True)
    request_id = f"{os.getpid()}-{time.time_ns()}"
    temp = root / f".{REQUEST_FILE}.tmp"
    temp.write_text(json.dumps({"id": request_id, "to": to_version, "force": force}))
    os.replace(temp, root / REQUEST_FILE)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result.exists():
            answer = json.loads(result.read_text())
            if answer.get("id") == request_id:
                return answer
        time.sleep(0.5)
    raise RollbackRefused(f"the daemon did not answer the rollback request within {timeout_s:.0f} s "
                          f"(it runs it between fragments); {root / REQUEST_FILE} is still pending")


def take_request(root: Path) -> dict | None:
    """The daemon's side: a pending rollback request, removed from the directory, or None."""
    path = root / REQUEST_FILE
    if not path.exists():
        return None
    try:
        request = json.loads(path.read_text())
    except (OSError, ValueError):
        request = {"id": None, "to": None, "force": False}
    path.unlink(missing_ok=True)
    return request


def answer_request(root: Path, request: dict, answer: dict) -> None:
    temp = root / f".{RESULT_FILE}.tmp"
    temp.write_text(json.dumps({"id": request.get("id"), **answer}))
    os.replace(temp, root / RESULT_FILE)


def run_rollback(store: CheckpointStore, ledger: Ledger, to_version: str, force: bool, earliest: Earliest) -> dict:
    """Plan and apply; the answer the command prints (and the daemon writes to the result file)."""
    try:
        plan = plan_rollback(store, to_version, earliest)
        manifest = apply_rollback(store, ledger, plan, force)
    except RollbackRefused as err:
        return {"ok": False, "version": None, "message": f"rollback refused: {err}"}
    replayed = ", ".join(str(o.request_id) for o in plan.replay) or "none"
    message = (f"published {manifest.version} = weights of {plan.to.version} (was {plan.current.version}); "
               f"CURRENT = {manifest.version}; {len(plan.replay)} requests will be applied again from their "
               f"records when the daemon consumes: {replayed}")
    if plan.lost:
        message += f"; {len(plan.lost)} recorded rolled_back without replay (--force): " + \
                   ", ".join(str(o.request_id) for o in plan.lost)
    return {"ok": True, "version": manifest.version, "message": message}
