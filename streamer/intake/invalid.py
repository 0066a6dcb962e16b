"""Why an event is rejected: `InvalidEvent`, and text that any UTF-8 store can hold.

A rejection has two texts. `reason` leaves the daemon (the dead letter and the `rejected` receipt,
that is, back to producers): it says what is wrong with the event, never what exists elsewhere
(no host paths, no other request's id, no dataset label). `detail`, for the operator's log and
`streamer produce`, may say more.
"""
from __future__ import annotations

from ..errors import StreamerError

MAX_REASON_CHARS = 1000  # a reason quotes event content: bounded, so dead letters and ledger rows stay small

__all__ = ["MAX_REASON_CHARS", "InvalidEvent", "storable_text"]


def storable_text(text: str) -> str:
    """`text` with unpaired surrogates and non-printable characters written as Python escapes
    (\\ud83d, \\x00): any UTF-8 store (SQLite, Kafka, JSON logs) takes the result."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _bounded(text: str) -> str:
    return storable_text(text if len(text) <= MAX_REASON_CHARS else
                         f"{text[:MAX_REASON_CHARS]}... ({len(text)} characters)")


class InvalidEvent(StreamerError):
    """The event cannot be processed as sent: dead-letter it and emit a `rejected` receipt.

    `request_id` is the event's id when it could be read (else None); `reason` says what is wrong
    (it goes back to producers); `detail` (default: the reason) is the operator's fuller account.
    """

    def __init__(self, reason: str, request_id: str | None = None, detail: str | None = None):
        reason = _bounded(reason)
        super().__init__(reason)
        self.reason = reason
        self.request_id = request_id
        self.detail = reason if detail is None else _bounded(detail)
