"""Intake of records into the fragment being collected (the record-level failure policy lives here).

Each polled record is either accepted into the pending fragment, kept as a repeat of a pending
request_id (answered `duplicate` with the version that applies the first), or answered at once:
`rejected` (dead letter first, then ledger row, then receipt) or `duplicate` of an applied
request. A record the ledger already knows (re-read after a crash) is skipped. Answered records'
offsets are committed with the next fragment. A rejection's reason leaves the daemon (dead letter,
ledger, receipt) and says what is wrong with the event; what it leaves out (a resolved path, the
request it conflicts with, a dataset's label: `InvalidEvent.detail`) goes to the log only.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from ..intake import ForgetRequest, Goal, InvalidEvent, SampleContext, parse_event, request_id_of, storable_text
from ..kafka import find_undecodable
from ..state import RequestOutcome, rfc3339
from ..telemetry import Metrics
from .goals import GoalIndex
from .outbox import Outbox

__all__ = ["Accepted", "Collector", "Repeat", "outcome_of"]


@dataclass(frozen=True)
class Accepted:
    """A valid request waiting in the fragment being collected."""

    request: ForgetRequest
    topic: str
    partition: int
    offset: int
    received_at: float  # monotonic seconds
    record_time_ms: int | None = None  # the record's Kafka timestamp (when it was written): the erasure report's start

    def outcome(self, status: str, reason: str | None, goal: Goal | None = None,
                numbers: Mapping[str, float | int | None] | None = None) -> RequestOutcome:
        """This request's outcome, not settled yet (`goal`: as applied; default: as requested)."""
        r = self.request
        received = None if self.record_time_ms is None else rfc3339(self.record_time_ms / 1000)
        return RequestOutcome(status=status, request_id=r.request_id, version=None, reason=reason, topic=self.topic,
                              partition=self.partition, offset=self.offset, subject=r.subject,
                              goal=goal if goal is not None else r.goal, requested_at=r.requested_at,
                              received_at=received, numbers=MappingProxyType(dict(numbers or {})),
                              sample_ref=r.sample_ref)


@dataclass(frozen=True)
class Repeat:
    """A request_id repeated while its first record waits in the fragment being collected."""

    request: ForgetRequest
    topic: str
    partition: int
    offset: int
    first: Accepted

    def outcome(self, reason: str) -> RequestOutcome:
        """The `duplicate` answer to this repeat, not settled yet."""
        return outcome_of("duplicate", self.request.request_id, None, reason, self, self.request.subject, None)


class Collector:
    """Sorts records into the pending fragment; `take()` hands the fragment to the pipeline."""

    def __init__(self, ctx: SampleContext, outbox: Outbox, metrics: Metrics, log: Any, goals: GoalIndex,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic):
        self._ctx, self._outbox, self._metrics, self._log, self._goals = ctx, outbox, metrics, log, goals
        self._clock, self._monotonic = clock, monotonic
        self.pending: list[Accepted] = []
        self.repeats: list[Repeat] = []
        self.held: list[tuple[ConsumerRecord, ForgetRequest]] = []  # valid, read while a fragment ran
        self.positions: dict[tuple[str, int], int] = {}  # next offset after the last handled record

    def handle(self, batch: Mapping[TopicPartition, Sequence[ConsumerRecord]]) -> None:
        """Sort each record (between fragments); answer the ones that need no fragment (dead letters
        flushed, then ledger rows, then receipts flushed)."""
        self._answer([(r, self._sort) for records in batch.values() for r in records])

    def screen(self, batch: Mapping[TopicPartition, Sequence[ConsumerRecord]], room: int) -> int:
        """While a fragment runs: answer every record that fails validation now, hold the valid ones
        (sorted by `release()` once the fragment is committed: their goals are checked against it).
        Returns how many more valid records `room` leaves room for."""
        self._answer([(r, self._screen) for records in batch.values() for r in records])
        return room - len(self.held)

    def release(self) -> None:
        """After a fragment: sort the records held while it ran, as `handle` would have."""
        held, self.held = self.held, []
        self._answer([(record, lambda r, dl, request=request: self._place(r, request, dl)) for record, request in held],
                     skip_handled=False)

    def _answer(self, work: Sequence[tuple[ConsumerRecord, Callable[..., RequestOutcome | None]]],
                skip_handled: bool = True) -> None:
        answered: list[RequestOutcome] = []
        dead_letters: list[Any] = []
        ledger = self._outbox.ledger
        for record, sort in work:
            self.positions[(record.topic, record.partition)] = record.offset + 1
            if skip_handled and ledger.handled(record.topic, record.partition, record.offset):
                self._log.info("record_already_handled", topic=record.topic, partition=record.partition,
                               offset=record.offset)
                continue
            outcome = sort(record, dead_letters)
            if outcome is not None:
                answered.append(outcome)
        if dead_letters:
            self._outbox.deliver(dead_letters)
        if answered:
            self._outbox.record(answered)

    def due(self, fragment_size: int, max_wait_s: float) -> bool:
        """A fragment is due when it is full or its oldest request waited max_wait_s."""
        if not self.pending:
            return False
        return len(self.pending) >= fragment_size or self._monotonic() - self.pending[0].received_at >= max_wait_s

    def wait_ms(self, poll_ms: int, max_wait_s: float) -> int:
        """How long the next poll may block without delaying a due fragment."""
        if not self.pending:
            return poll_ms
        due_in = self.pending[0].received_at + max_wait_s - self._monotonic()
        return max(0, min(poll_ms, int(due_in * 1000)))

    def take(self, offsets: Mapping[str, Mapping[int, int]], limit: int) -> tuple[list[Accepted], list[Repeat], dict]:
        """The next fragment (the first `limit` pending requests), their repeats, and the offsets to
        publish with it: CURRENT's offsets advanced to the positions read so far, but never past a
        record still unanswered (a pending request left for the next fragment, its repeats, a held
        record): a crash after the publish re-reads it."""
        accepted, self.pending = self.pending[:limit], self.pending[limit:]
        taken = {id(a) for a in accepted}
        repeats = [r for r in self.repeats if id(r.first) in taken]
        self.repeats = [r for r in self.repeats if id(r.first) not in taken]
        advanced = {t: dict(p) for t, p in offsets.items()}
        for (topic, partition), offset in self.positions.items():
            advanced.setdefault(topic, {})[partition] = offset
        for left in (*self.pending, *self.repeats, *(record for record, _ in self.held)):
            here = advanced.setdefault(left.topic, {})
            here[left.partition] = min(here.get(left.partition, left.offset), left.offset)
        return accepted, repeats, advanced

    def clear(self) -> int:
        """Forget everything collected (a rollback or rebase: re-read from CURRENT's offsets); returns
        how many were pending or held."""
        dropped = len(self.pending) + len(self.held)
        self.pending, self.repeats, self.held, self.positions = [], [], [], {}
        return dropped

    def skip_undecodable(self, consumer: KafkaConsumer, open_probe: Callable[[], KafkaConsumer],
                         error: Exception) -> bool:
        """Record-level policy for a batch the client cannot decode (`kafka.find_undecodable`): each
        skipped offset gets a `rejected` ledger row, the run one dead letter naming partition and
        offsets, and the position moves past it (committed with the next fragment). False when no
        partition fails to decode (the error is not about the data: the caller treats it as
        infrastructure)."""
        self._log.warning("poll_failed", error=f"{type(error).__name__}: {error}",
                          action="probing each assigned partition")
        found = find_undecodable(consumer, open_probe, self._log)
        if found is None:
            return False
        tp, first, last = found
        reason = storable_text(f"undecodable record batch, offsets {first}-{last} of {tp.topic}/{tp.partition} "
                               f"skipped: {type(error).__name__}: {error}")[:1000]
        now = rfc3339(self._clock())
        outbox = self._outbox
        outbox.deliver([outbox.send_dead_letter(reason, None, tp.topic, tp.partition, first, None, None, now)])
        outbox.record([RequestOutcome(status="rejected", request_id=None, version=None, reason=reason, topic=tp.topic,
                                      partition=tp.partition, offset=offset, subject=None, completed_at=now)
                       for offset in range(first, last + 1)])
        self.positions[(tp.topic, tp.partition)] = last + 1
        self._metrics.count_failure("undecodable")
        return True

    def _parse(self, record: ConsumerRecord) -> ForgetRequest:
        """The record's request; any failure that depends on the record's bytes is InvalidEvent
        (record-level policy: the record is rejected, the daemon keeps going)."""
        if record.value is None:
            raise InvalidEvent("the record has no value (a tombstone)")
        if not isinstance(record.value, bytes):
            raise InvalidEvent(f"the record value is a {type(record.value).__name__}, expected bytes")
        try:
            return parse_event(record.value, self._ctx)
        except InvalidEvent:
            raise
        except Exception as err:  # noqa: BLE001 - a decoder bug or a hostile input: this record only
            raise InvalidEvent(f"the event could not be decoded ({type(err).__name__})",
                               detail=f"the event could not be decoded: {type(err).__name__}: {err}") from err

    def _conflict(self, request: ForgetRequest) -> InvalidEvent | None:
        """Why `request` cannot be taken: its request_id names an applied or pending request with
        other content, or its goal cannot be met together with an applied or pending request for
        the same instance (e.g. two relabels to different classes); None if it can."""
        pending = [(a.request.request_id, a.request.goal, a.request.x) for a in self.pending]
        return self._goals.reused(request, pending) or self._goals.conflict(request, pending)

    def _sort(self, record: ConsumerRecord, dead_letters: list[Any]) -> RequestOutcome | None:
        request = self._valid(record, dead_letters)
        return request if not isinstance(request, ForgetRequest) else self._place(record, request, dead_letters)

    def _screen(self, record: ConsumerRecord, dead_letters: list[Any]) -> RequestOutcome | None:
        request = self._valid(record, dead_letters)
        if isinstance(request, ForgetRequest):
            self.held.append((record, request))
            return None
        return request

    def _valid(self, record: ConsumerRecord, dead_letters: list[Any]) -> ForgetRequest | RequestOutcome:
        """The record's request, or its `rejected` outcome (dead letter queued)."""
        start = time.perf_counter()
        try:
            return self._parse(record)
        except InvalidEvent as err:
            return self._reject(record, err, dead_letters)
        finally:
            self._metrics.observe_stage("resolve", time.perf_counter() - start)

    def _reject(self, record: ConsumerRecord, err: InvalidEvent, dead_letters: list[Any]) -> RequestOutcome:
        request_id = err.request_id or _request_id_of(record)
        now = rfc3339(self._clock())
        if err.detail != err.reason:  # what the producer is not told, for the operator only
            self._log.bind(request_id=request_id, partition=record.partition, offset=record.offset).info(
                "event_rejected_detail", topic=record.topic, reason=err.reason, detail=err.detail)
        dead_letters.append(self._outbox.send_dead_letter(err.reason, request_id, record.topic, record.partition,
                                                          record.offset, record.key, record.value, now))
        return outcome_of("rejected", request_id, None, err.reason, record, None, now)

    def _place(self, record: ConsumerRecord, request: ForgetRequest, dead_letters: list[Any]) -> RequestOutcome | None:
        """A valid request into the pending fragment, or answered: rejected (a conflicting goal or a
        reused id), duplicate (owed, applied, or pending: then a repeat)."""
        conflict = self._conflict(request)
        if conflict is not None:
            return self._reject(record, conflict, dead_letters)
        ledger = self._outbox.ledger
        if ledger.owed(request.request_id):
            return outcome_of("duplicate", request.request_id, None,
                              f"request_id {request.request_id} is deferred (owed): it is applied when a retrained "
                              "model takes over", record, request.subject, rfc3339(self._clock()))
        applied_in = ledger.applied(request.request_id)
        if applied_in is not None:
            return outcome_of("duplicate", request.request_id, applied_in,
                              f"request_id {request.request_id} was already applied in {applied_in}",
                              record, request.subject, rfc3339(self._clock()))
        first = next((p for p in self.pending if p.request.request_id == request.request_id), None)
        if first is not None:  # answered with the version that applies the first one
            self.repeats.append(Repeat(request, record.topic, record.partition, record.offset, first))
            return None
        self.pending.append(Accepted(request, record.topic, record.partition, record.offset, self._monotonic(),
                                     record.timestamp if record.timestamp is not None and record.timestamp >= 0 else None))
        return None


def _request_id_of(record: ConsumerRecord) -> str | None:
    try:
        return request_id_of(record.value or b"", record.key if isinstance(record.key, bytes) else None)
    except Exception:  # noqa: BLE001 - best effort only: the record is rejected either way
        return None


def outcome_of(status: str, request_id: str | None, version: str | None, reason: str | None,
               record: ConsumerRecord | Repeat, subject: str | None, completed_at: str | None) -> RequestOutcome:
    """The outcome of one record whose request's goal does not matter (rejected, duplicate)."""
    return RequestOutcome(status=status, request_id=request_id, version=version, reason=reason, topic=record.topic,
                          partition=record.partition, offset=record.offset, subject=subject, completed_at=completed_at)
