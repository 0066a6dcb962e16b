"""What the daemon tells the world, in the order the delivery guarantees need.

    dead letters flushed -> ledger rows appended -> receipts (+ checkpoint record) flushed
    -> receipts noted as sent in the ledger

The ledger row comes before the receipt, so a crash in between is repaired on start by
`send_owed()` (receipts are at least once: consumers dedupe on request_id / version).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError

from ..config import KafkaTopics
from ..errors import StreamerError
from ..kafka import records
from ..state import Ledger, Manifest, RequestOutcome, rfc3339
from ..telemetry import Metrics

DELIVERY_TIMEOUT_S = 120.0

__all__ = ["DELIVERY_TIMEOUT_S", "DeliveryError", "Outbox"]


class DeliveryError(StreamerError):
    """Kafka did not take a receipt, dead letter or checkpoint record: stop; they are re-sent on start."""


class Outbox:
    """Ledger rows, receipts, dead letters and checkpoint records for one daemon."""

    def __init__(self, producer: KafkaProducer, topics: KafkaTopics, ledger: Ledger, metrics: Metrics, log: Any,
                 clock: Callable[[], float] = time.time, dead_letter_payload: bool = False, max_record_bytes: int = 1_048_576):
        self.producer, self.topics, self.ledger = producer, topics, ledger
        self._dead_letter_payload = dead_letter_payload
        self._dead_letter_max = max(4096, max_record_bytes - 16_384)  # headroom for headers and batch overhead
        self._metrics, self._log, self._clock = metrics, log, clock

    def deliver(self, futures: Sequence[Any]) -> None:
        """Block until Kafka acknowledged every send (flush alone does not surface failures).

        Raises DeliveryError when a send failed or timed out (DELIVERY_TIMEOUT_S)."""
        self.producer.flush(timeout=DELIVERY_TIMEOUT_S)
        for future in futures:
            try:
                future.get(timeout=DELIVERY_TIMEOUT_S)
            except KafkaError as err:
                raise DeliveryError(f"Kafka did not acknowledge a record: {err!r}") from err

    def send_dead_letter(self, reason: str, request_id: str | None, topic: str, partition: int, offset: int,
                         key: bytes | None, value: bytes | None, rejected_at: str) -> Any:
        """Queue one dead letter; the caller delivers it before the ledger row is written."""
        k, v, headers = records.dead_letter(reason, request_id, topic, partition, offset, key, value, rejected_at,
                                            self._dead_letter_payload, self._dead_letter_max)
        return self.producer.send(self.topics.dead_letter, key=k, value=v, headers=headers)

    def send_checkpoint_record(self, manifest: Manifest, path: Path) -> None:
        """The checkpoints-topic record of a version, delivered (at least once)."""
        key, value = records.checkpoint_record(manifest, path)
        self.deliver([self.producer.send(self.topics.checkpoints, key=key, value=value)])

    def record(self, outcomes: Sequence[RequestOutcome], extra: Sequence[tuple[str, bytes, bytes]] = ()) -> None:
        """Ledger rows, then receipts and the `extra` (topic, key, value) records delivered, then the
        receipts noted as sent; counts and logs each outcome. Raises LedgerError / DeliveryError."""
        self.send(self.append(outcomes), outcomes, extra)

    def append(self, outcomes: Sequence[RequestOutcome]) -> list[int]:
        """The ledger rows alone (each outcome settled); their seqs, for `send`."""
        return self.ledger.append(outcomes)

    def send(self, seqs: Sequence[int], outcomes: Sequence[RequestOutcome],
             extra: Sequence[tuple[str, bytes, bytes]] = ()) -> None:
        """The receipts of outcomes already in the ledger (`seqs`, from `append`), and `extra`,
        delivered; then noted as sent. Counts and logs each outcome."""
        futures = [self.producer.send(topic, key=key, value=value) for topic, key, value in extra]
        sent = []
        for seq, outcome in zip(seqs, outcomes, strict=True):
            if outcome.request_id is not None:
                key, value = records.receipt(outcome)
                futures.append(self.producer.send(self.topics.receipts, key=key, value=value))
                sent.append(seq)
        self.deliver(futures)
        self.ledger.mark_receipts_sent(sent, rfc3339(self._clock()))
        for outcome in outcomes:
            if outcome.status == "abandoned":  # a later outcome of an applied request, not a new request
                self._metrics.count_abandoned()
            else:
                self._metrics.count_request(outcome.status)
            self._log.bind(request_id=outcome.request_id, partition=outcome.partition, offset=outcome.offset,
                           version=outcome.version).info(
                "request_outcome", status=outcome.status, topic=outcome.topic, reason=outcome.reason)

    def send_owed(self) -> int:
        """Re-send the receipts the ledger still owes (a crash between row and receipt); returns how many."""
        owed = self.ledger.unsent_receipts()
        if not owed:
            return 0
        futures = []
        for row in owed:
            key, value = records.receipt(row.outcome)
            futures.append(self.producer.send(self.topics.receipts, key=key, value=value))
        self.deliver(futures)
        self.ledger.mark_receipts_sent([row.seq for row in owed], rfc3339(self._clock()))
        self._log.info("owed_receipts_sent", receipts=len(owed))
        return len(owed)
