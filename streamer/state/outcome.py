"""One request's outcome: made once where it is decided, carried unchanged to every sink.

A `RequestOutcome` is built where its status is decided (the collector for `rejected` and early
`duplicate`s, the fragment worker for applied requests, the failure policy for requests it never
applied, the commit for repeats and `abandoned`), gets its version and time when the commit
settles it (`settled`), and is then written as it is to the manifest (`to_manifest`, the one
place a manifest row is made), the ledger (`state/ledger.py`, columns) and the receipt
(`kafka/records.receipt`). Reading back (`from_manifest`, the ledger's rows) gives the same type.

Statuses: forgotten | relabelled (applied, goal met), failed (with a version: applied, goal missed
at the cap, kept in the retained set; without one: never applied), deferred (not applied: the
utility budget was reached; owed until a rebase applies it), duplicate, rejected; and, with no
receipt, rolled_back, abandoned, rebased (a rebase onto a retrained model covered the request).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from ..intake import Goal

STATUSES = ("forgotten", "relabelled", "duplicate", "rejected", "failed", "rolled_back", "abandoned", "deferred",
            "rebased")
APPLIED = ("forgotten", "relabelled", "failed")  # in the model when the outcome has a version
RECEIPTED = ("forgotten", "relabelled", "duplicate", "rejected", "failed", "deferred")  # statuses with a receipt

__all__ = ["APPLIED", "RECEIPTED", "STATUSES", "RequestOutcome"]

_RECORD_KEYS = ("request_id", "status", "reason", "topic", "partition", "offset", "subject")


@dataclass(frozen=True)
class RequestOutcome:
    """What happened to one record. `request_id` is None only for a rejected event whose id
    could not be read; (topic, partition, offset) then identifies it. Raises ValueError for an
    unknown status."""

    status: str
    request_id: str | None
    version: str | None  # the version that holds the request (duplicate: the one that applied it)
    reason: str | None
    topic: str
    partition: int
    offset: int
    subject: str | None
    completed_at: str | None = None  # RFC 3339; set by the commit that settles it (`settled`)
    goal: Goal | None = None  # when the request was read: its goal (unseen: the class it resolved to)
    requested_at: str | None = None  # the event's own timestamp
    received_at: str | None = None  # RFC 3339 of the record's Kafka timestamp
    sample_ref: Mapping[str, Any] | None = None  # {"dataset", "index"} or {"uri"} (intake.ForgetRequest.sample_ref)
    # Measured numbers behind the status (e.g. goal_gap: by how much, in logits, the goal was missed)
    numbers: Mapping[str, float | int | None] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown status {self.status!r}; expected one of {', '.join(STATUSES)}")

    @property
    def mode(self) -> str | None:
        return None if self.goal is None else self.goal.mode

    @property
    def target_class(self) -> int | None:
        """The class its goal sends the instance to (relabel: target_label; unseen: the resolved
        class; misclassify, or unknown: None)."""
        return None if self.goal is None or self.goal.mode == "misclassify" else self.goal.target_class

    @property
    def applied(self) -> bool:
        """The request is in the model: an applied status (or a duplicate of one) with the version
        that holds it. False for `failed` without a version (never applied: re-send it), `deferred`
        (owed until a rebase) and `rejected`."""
        return self.status in (*APPLIED, "duplicate") and self.version is not None

    def settled(self, version: str | None, completed_at: str) -> RequestOutcome:
        """This outcome as its commit records it."""
        return replace(self, version=version, completed_at=completed_at)

    def rolled_back(self, reason: str, completed_at: str) -> RequestOutcome:
        """The `rolled_back` row that undoes this applied outcome (no receipt; the goal stays off it)."""
        return RequestOutcome(status="rolled_back", request_id=self.request_id, version=self.version, reason=reason,
                              topic=self.topic, partition=self.partition, offset=self.offset, subject=self.subject,
                              completed_at=completed_at)

    def to_manifest(self) -> dict[str, Any]:
        """The manifest row (schema 2): the record's keys, plus the goal's when the request was
        read; a version's rows take their version and time from the manifest itself."""
        row: dict[str, Any] = {key: getattr(self, key) for key in _RECORD_KEYS}
        if self.goal is not None:
            g = self.goal
            row.update(mode=g.mode, label=g.label, target_label=g.target_class if g.mode == "relabel" else None,
                       target_class=self.target_class, requested_at=self.requested_at, received_at=self.received_at)
            if self.sample_ref is not None:
                row["sample_ref"] = dict(self.sample_ref)
        if self.numbers:
            row["numbers"] = dict(self.numbers)
        return row

    @staticmethod
    def from_manifest(row: Mapping[str, Any], version: str | None = None,
                      completed_at: str | None = None) -> RequestOutcome:
        """A manifest row (any schema) as the outcome it records. Raises KeyError/ValueError for
        a malformed row."""
        mode = row.get("mode")
        goal = None
        if mode is not None:
            target = row.get("target_class")
            if target is None and mode == "relabel":
                target = row.get("target_label")
            goal = Goal(str(mode), _int(row.get("label")), _int(target))
        return RequestOutcome(
            status=str(row["status"]), request_id=row.get("request_id"), version=version, reason=row.get("reason"),
            topic=str(row["topic"]), partition=int(row["partition"]), offset=int(row["offset"]),
            subject=row.get("subject"), completed_at=completed_at, goal=goal, requested_at=row.get("requested_at"),
            received_at=row.get("received_at"), numbers=MappingProxyType(dict(row.get("numbers") or {})),
            sample_ref=row.get("sample_ref"))


def _int(value: Any) -> int | None:
    return None if value is None else int(value)
