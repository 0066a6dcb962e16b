"""Record batches the Kafka client cannot decode: found, bounded by offset, and skipped.

kafka-python raises from `poll()` when a fetched batch cannot be decoded (a codec library that is
not installed, a CRC mismatch, a malformed batch) and leaves the partition's position where it
was, so without this the daemon would fail on the same offset forever. Kafka returns whole
batches, so a fetch from any offset inside a bad batch fails the same way: the undecodable run
is found by probing offset by offset with a separate consumer until a fetch succeeds (or the log
ends). The caller records an outcome for every skipped offset.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from ..intake.samples import storable_text
from ..state.checkpoints import rfc3339
from ..state.ledger import Outcome
from .metrics import Metrics
from .outbox import Outbox

__all__ = ["MAX_SKIP", "find_undecodable", "skip_undecodable"]

MAX_SKIP = 100_000  # offsets one undecodable run may span before the search gives up
PROBE_S = 3.0  # how long one offset is fetched before it counts as past the end of the log


def find_undecodable(consumer: KafkaConsumer, open_probe: Callable[[], KafkaConsumer], log: Any,
                     probe_s: float = PROBE_S) -> tuple[TopicPartition, int, int] | None:
    """(partition, first, last) of the undecodable run at an assigned partition's position, and
    the consumer sought to `last + 1`; None when no partition fails to decode (the error was not
    about the data). The probing runs on a separate, group-less consumer from `open_probe()`, so
    the group consumer's membership, positions and pause state are not touched."""
    positions = {tp: consumer.position(tp) for tp in consumer.assignment() if tp not in consumer.paused()}
    probe = open_probe()
    try:
        for tp, first in positions.items():
            probe.assign([tp])
            error = _probe(probe, tp, first, probe_s)
            if error is None:
                continue
            last = first
            while last - first < MAX_SKIP and _probe(probe, tp, last + 1, probe_s) is not None:
                last += 1
            consumer.seek(tp, last + 1)
            log.warning("undecodable_batch_skipped", topic=tp.topic, partition=tp.partition, first=first, last=last,
                        error=f"{type(error).__name__}: {error}")
            return tp, first, last
        return None
    finally:
        probe.close()


def skip_undecodable(consumer: KafkaConsumer, open_probe: Callable[[], KafkaConsumer], error: Exception,
                     outbox: Outbox, positions: dict[tuple[str, int], int], metrics: Metrics, log: Any,
                     clock: Callable[[], float] = time.time) -> bool:
    """Record-level policy for a batch the client cannot decode: each skipped offset gets a
    `rejected` ledger row, the run one dead letter naming partition and offsets, and `positions`
    moves past it (committed with the next fragment). False when no partition fails to decode
    (the error is not about the data: the caller treats it as infrastructure)."""
    log.warning("poll_failed", error=f"{type(error).__name__}: {error}", action="probing each assigned partition")
    found = find_undecodable(consumer, open_probe, log)
    if found is None:
        return False
    tp, first, last = found
    reason = storable_text(f"undecodable record batch, offsets {first}-{last} of {tp.topic}/{tp.partition} "
                           f"skipped: {type(error).__name__}: {error}")[:1000]
    now = rfc3339(clock())
    outbox.deliver([outbox.send_dead_letter(reason, None, tp.topic, tp.partition, first, None, None, now)])
    outbox.record([Outcome(status="rejected", request_id=None, version=None, reason=reason, topic=tp.topic,
                           partition=tp.partition, offset=offset, subject=None, completed_at=now)
                   for offset in range(first, last + 1)])
    positions[(tp.topic, tp.partition)] = last + 1
    metrics.count_failure("undecodable")
    return True


def _probe(consumer: KafkaConsumer, tp: TopicPartition, offset: int, probe_s: float) -> Exception | None:
    """The error fetching from `offset` raises, or None once a record arrives (the consumer is
    then put back at `offset`) or nothing does within probe_s (past the end of the log)."""
    consumer.seek(tp, offset)
    deadline = time.monotonic() + probe_s
    while time.monotonic() < deadline:
        try:
            records = consumer.poll(timeout_ms=200, max_records=1)
        except Exception as err:  # noqa: BLE001 - whatever the decoder raises is the answer
            return err
        if records:
            consumer.seek(tp, offset)
            return None
        highwater = consumer.highwater(tp)
        if highwater is not None and offset >= highwater:
            return None
    consumer.seek(tp, offset)
    return None
