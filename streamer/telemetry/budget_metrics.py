"""The utility budget's metrics: requests deferred until a rebase, their erasure deadline, and the
"retrain advised" signal that comes before the budget is reached (pipeline/budget.py sets them)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge

from .optional_gauge import OptionalGauge

__all__ = ["BudgetMetrics"]


class BudgetMetrics:
    """Registered on the daemon's registry by `Metrics` (`Metrics.budget`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.deferred = Gauge(
            "streamer_deferred_requests", "Requests deferred by the utility budget and still owed (applied by the "
            "next rebase onto a retrained model).", registry=registry)
        self.deadline = Gauge(
            "streamer_deferred_deadline_timestamp_seconds", "Unix time of the earliest erasure deadline among the "
            "deferred requests (+Inf when none is owed: no deadline).", registry=registry)
        self.advised = Gauge(
            "streamer_retrain_advised", "1 when a retrain (then `streamer rebase`) is advised: audit drift or the "
            "forgotten fraction reached its threshold, or requests are deferred; else 0.", registry=registry)
        self.forgotten_fraction = OptionalGauge(
            "streamer_forgotten_fraction_ratio", "Requests applied since the lineage's base, over "
            "model.training_set_size (absent without it).", registry)

    def set(self, deferred: int, deadline: float | None, advised: bool, fraction: float | None) -> None:
        """Record the budget's state. Raises ValueError for a negative count or a ratio outside [0, 1e6)."""
        if deferred < 0 or (fraction is not None and not 0 <= fraction < 1e6):
            raise ValueError(f"deferred {deferred} and forgotten fraction {fraction} must be >= 0")
        self.deferred.set(deferred)
        self.deadline.set(deadline if deadline is not None else float("inf"))
        self.advised.set(1 if advised else 0)
        if fraction is not None:
            self.forgotten_fraction.set(fraction)
