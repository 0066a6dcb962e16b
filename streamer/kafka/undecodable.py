"""Record batches the Kafka client cannot decode: found, bounded by offset, and skipped.

kafka-python raises from `poll()` when a fetched batch cannot be decoded (a codec library that is
not installed, a CRC mismatch, a malformed batch) and leaves the partition's position where it
was, so without this the daemon would fail on the same offset forever. Kafka returns whole
batches, so a fetch from any offset inside a bad batch fails the same way: the undecodable run
is found by probing offset by offset with a separate consumer until a fetch succeeds (or the log
ends). The caller records an outcome for every skipped offset (`pipeline.Collector.skip_undecodable`).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kafka import KafkaConsumer, TopicPartition


__all__ = ["MAX_SKIP", "find_undecodable"]

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
