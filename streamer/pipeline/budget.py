"""The utility budget between retrainings: what is owed, by when, and when to retrain.

A deletion daemon is a bridge between retrainings. Every applied request costs the served model
some accuracy; `unlearning.max_audit_drop` is the budget, and a fragment that would spend past it
is deferred (quarantine.py): its requests are owed until a model retrained without them takes
over (`streamer rebase`). Before that, "retrain advised" says it is time: the audit drift reached
`unlearning.retrain_advised_drift` (default half the budget), or the requests applied since the
lineage's base reached `unlearning.retrain_advised_fraction` of `model.training_set_size`, or
some request is deferred. A deferred request's erasure deadline is its record's time (else the
deferral's) plus `privacy.erasure_deadline_days` (GDPR Art. 12(3): one month).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config import DaemonConfig
from ..state import Manifest, parse_rfc3339
from ..telemetry import Metrics

DAY_S = 86_400.0

__all__ = ["UtilityBudget", "deadline_of"]


def deadline_of(row: Mapping[str, Any], days: float) -> float:
    """Unix seconds by which a deferred request (its manifest row) must be erased."""
    start = row.get("received_at") or row.get("deferred_at")
    return (parse_rfc3339(str(start)) if start else 0.0) + days * DAY_S


@dataclass
class UtilityBudget:
    """Sets the budget's gauges after every version (and at start) and logs when advice changes."""

    metrics: Metrics
    log: Any
    baseline: float | None  # the base model's audit accuracy
    max_drop: float | None
    advise_drift: float | None
    training_set_size: int | None
    advise_fraction: float
    deadline_days: float
    applied_since_base: int = 0
    advised: bool = False

    @staticmethod
    def of(cfg: DaemonConfig, metrics: Metrics, log: Any, baseline: float | None) -> UtilityBudget:
        u = cfg.unlearning
        drift = u.retrain_advised_drift if u.retrain_advised_drift is not None else (
            None if u.max_audit_drop is None else u.max_audit_drop / 2)
        return UtilityBudget(metrics, log, baseline, u.max_audit_drop, drift, cfg.model.training_set_size,
                             u.retrain_advised_fraction, cfg.privacy.erasure_deadline_days)

    def start(self, lineage: list[Manifest]) -> None:
        """At start: the requests applied since the lineage's base (newest first, the base last)."""
        self.applied_since_base = sum(len(m.requests) for m in lineage)
        self.observe(lineage[0], applied=0)

    def observe(self, manifest: Manifest, applied: int | None = None) -> None:
        """After `manifest` became CURRENT (`applied`: its requests, counted by default)."""
        self.applied_since_base += len(manifest.requests) if applied is None else applied
        deadlines = [deadline_of(d, self.deadline_days) for d in manifest.deferred]
        fraction = (self.applied_since_base / self.training_set_size) if self.training_set_size else None
        audit = manifest.metrics.get("audit_accuracy")
        drift = (self.baseline - float(audit)) if self.baseline is not None and audit is not None else None
        why = []
        if drift is not None and self.advise_drift is not None and drift >= self.advise_drift:
            why.append(f"audit drift {drift:.4f} >= {self.advise_drift:g}")
        if fraction is not None and fraction >= self.advise_fraction:
            why.append(f"{fraction:.4f} of the training set forgotten >= {self.advise_fraction:g}")
        if deadlines:
            why.append(f"{len(deadlines)} requests deferred (the budget was reached)")
        self.metrics.budget.set(len(deadlines), min(deadlines) if deadlines else None, bool(why), fraction)
        if bool(why) != self.advised:
            self.advised = bool(why)
            self.log.bind(version=manifest.version).warning(
                "retrain_advised" if why else "retrain_no_longer_advised", reasons=why or None,
                applied_since_base=self.applied_since_base)
