"""The KMS's metric (state/kms.py reports to it): failed calls to a KMS that holds the vault's KEK."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

__all__ = ["KmsMetrics", "OPERATIONS"]

OPERATIONS = ("Encrypt", "Decrypt", "ScheduleKeyDeletion")  # the calls a running daemon makes


class KmsMetrics:
    """Registered on the daemon's registry by `Metrics` (`Metrics.kms`); `operation` is a KMS API
    operation name (a closed set), never a key id or an error message."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.errors = Counter(
            "streamer_kms_errors", "KMS calls that failed (unreachable, throttled, refused); unreachable and "
            "throttled calls are retried for privacy.kek_kms.outage_s.", ["operation"], registry=registry)

    def configured(self) -> None:
        """Pre-initialise every operation's series (0) when the KEK is a KMS key."""
        for operation in OPERATIONS:
            self.errors.labels(operation=operation)

    def failed(self, operation: str) -> None:
        self.errors.labels(operation=operation if operation in OPERATIONS else "other").inc()
