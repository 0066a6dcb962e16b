"""Prometheus metrics of the daemon (served by `http.serve`).

`Metrics` owns every metric on the registry it is given (tests pass a fresh
`CollectorRegistry`). Labels only ever take the closed sets below: request ids and subjects
never become labels, so the number of series stays fixed.

The audit gauges (`streamer_accuracy_ratio{set="audit"}`, the drift and the baseline) stay
absent until an audit accuracy is known: a deployment without audit data (`data.audit: null`)
must not expose a zero that reads as "audit accuracy collapsed" and fires the drift alert.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .budget_metrics import BudgetMetrics
from .kms_metrics import KmsMetrics
from .optional_gauge import OptionalGauge
from .publish_metrics import PublishMetrics

ACCURACY_SETS = ("fragment", "forgotten", "audit")
REQUEST_OUTCOMES = ("forgotten", "relabelled", "duplicate", "rejected", "failed", "deferred")
FRAGMENT_OUTCOMES = ("goal", "goal_features_unmet", "step_cap", "time_cap", "failed", "deferred")
FAILURE_KINDS = ("engine_error", "non_finite", "utility_floor", "undecodable")
STAGES = ("resolve", "unseen", "adversarial", "importance", "unlearn", "evaluate", "checkpoint")

# 10 ms (decoding one request) .. 30 min (a fragment running into unlearning.max_seconds with
# a slow checkpoint store), roughly 1-2.5-5 per decade.
STAGE_BUCKETS_SECONDS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0, 600.0, 900.0, 1200.0, 1800.0,
)

__all__ = [
    "ACCURACY_SETS",
    "FAILURE_KINDS",
    "FRAGMENT_OUTCOMES",
    "REQUEST_OUTCOMES",
    "STAGES",
    "STAGE_BUCKETS_SECONDS",
    "Metrics",
]


def _check_member(kind: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; expected one of {', '.join(allowed)}")


def _check_ratio(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a ratio in [0, 1], got {value!r}")


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def _check_seconds(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be finite, non-negative seconds, got {value!r}")


class Metrics:
    """Every metric the daemon exports, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.accuracy = Gauge(
            "streamer_accuracy_ratio",
            "Accuracy of the current model on a set of instances: the last fragment, every "
            "forgotten instance (goal: 0), or the held-out audit set.",
            ["set"],
            registry=registry,
        )
        self.audit_drift = OptionalGauge(
            "streamer_audit_accuracy_drift_ratio",
            "Audit accuracy of the original model minus that of the current model.",
            registry,
        )
        self.audit_baseline = OptionalGauge(
            "streamer_audit_accuracy_baseline_ratio",
            "Audit accuracy of the original model, before any unlearning.",
            registry,
        )
        self.requests = Counter(
            "streamer_requests",
            "Deletion requests handled, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.failures = Counter(
            "streamer_fragment_failures",
            "Failed attempts under the failure policy: a group of requests the engine raised on, that gave "
            "non-finite outputs or broke the utility floor, and undecodable record batches skipped.",
            ["kind"],
            registry=registry,
        )
        self.abandoned = Counter(
            "streamer_abandoned_instances",
            "Forgotten instances that left the retained set because their goal stayed out of reach.",
            registry=registry,
        )
        self.fragments = Counter(
            "streamer_fragments",
            "Fragments unlearned, by how the fragment ended.",
            ["outcome"],
            registry=registry,
        )
        self.stage_duration = Histogram(
            "streamer_stage_duration_seconds",
            "Wall-clock duration of one pipeline stage.",
            ["stage"],
            buckets=STAGE_BUCKETS_SECONDS,
            registry=registry,
        )
        self.checkpoint_version = Gauge(
            "streamer_checkpoint_version",
            "Number in the name of the last published checkpoint version.",
            registry=registry,
        )
        self.consumer_lag = Gauge(
            "streamer_consumer_lag_messages",
            "Deletion requests on the requests topic not yet consumed.",
            registry=registry,
        )
        self.last_fragment_timestamp = Gauge(
            "streamer_last_fragment_timestamp_seconds",
            "Unix time at which the last fragment finished.",
            registry=registry,
        )
        self.fragment_steps = Gauge("streamer_fragment_steps", "Optimizer steps taken by the last fragment.",
                                    registry=registry)
        self.forgotten_instances = Gauge(
            "streamer_forgotten_instances",
            "Instances in the retained forgotten set.",
            registry=registry,
        )
        self.vault_entries = Gauge(
            "streamer_vault_entries",
            "Instances held encrypted in the forget vault (applied, verification window still open).",
            registry=registry,
        )
        self.vault_oldest_age = Gauge(
            "streamer_vault_oldest_entry_age_seconds",
            "Age of the oldest instance still in the forget vault (0 when it is empty).",
            registry=registry,
        )
        self.vault_window = Gauge(
            "streamer_vault_verify_window_seconds",
            "The configured verification window (privacy.verify_window.days): entries older than this are overdue.",
            registry=registry,
        )
        self.vault_shreds = Counter(
            "streamer_vault_shreds", "Instances crypto-shredded (data key destroyed), by whether the final check "
            "before the shred found the goal met on the current weights.", ["verified"], registry=registry)
        self.budget = BudgetMetrics(registry)  # deferred requests, erasure deadlines, retrain advised
        self.publish = PublishMetrics(registry)  # publish targets: versions behind, failed uploads
        self.kms = KmsMetrics(registry)  # failed calls to the KMS holding the KEK
        self._audit_accuracy: float | None = None
        self._audit_lock = threading.RLock()
        # Pre-initialised so that increase()/rate() see the first event, and dashboards show 0
        # rather than "no data".
        for outcome in REQUEST_OUTCOMES:
            self.requests.labels(outcome=outcome)
        for kind in FAILURE_KINDS:
            self.failures.labels(kind=kind)
        for outcome in FRAGMENT_OUTCOMES:
            self.fragments.labels(outcome=outcome)
        for stage in STAGES:
            self.stage_duration.labels(stage=stage)
        for verified in ("true", "false"):
            self.vault_shreds.labels(verified=verified)

    def observe_fragment(
        self,
        outcome: str,
        steps: int,
        stage_seconds: Mapping[str, float],
        accuracies: Mapping[str, float],
        version: int,
        timestamp: float,
        published: bool = True,
    ) -> None:
        """Record one finished fragment, published or not (not: nothing applied, no version; the
        checkpoint gauges keep CURRENT's). Everything is checked before anything
        is recorded. `accuracies` maps a set ("fragment", "forgotten", "audit") to a ratio; a set
        left out keeps its previous value, or stays absent if it never had one."""
        _check_member("fragment outcome", outcome, FRAGMENT_OUTCOMES)
        _check_count("steps", steps)
        for stage, seconds in stage_seconds.items():
            _check_member("stage", stage, STAGES)
            _check_seconds(f"stage_seconds[{stage!r}]", seconds)
        for name, value in accuracies.items():
            _check_member("accuracy set", name, ACCURACY_SETS)
            _check_ratio(f"accuracies[{name!r}]", value)
        _check_count("version", version)
        _check_seconds("timestamp", timestamp)

        self.fragments.labels(outcome=outcome).inc()
        self.fragment_steps.set(steps)
        for stage, seconds in stage_seconds.items():
            self.stage_duration.labels(stage=stage).observe(seconds)
        self._set_accuracies(accuracies)
        if published:
            self.checkpoint_version.set(version)
            self.last_fragment_timestamp.set(timestamp)

    def set_accuracies(self, accuracies: Mapping[str, float]) -> None:
        """Set the accuracy gauges without a fragment (e.g. from CURRENT's manifest at start-up)."""
        for name, value in accuracies.items():
            _check_member("accuracy set", name, ACCURACY_SETS)
            _check_ratio(f"accuracies[{name!r}]", value)
        self._set_accuracies(accuracies)

    def _set_accuracies(self, accuracies: Mapping[str, float]) -> None:
        for name, value in accuracies.items():
            self.accuracy.labels(set=name).set(value)
        if "audit" in accuracies:
            with self._audit_lock:
                self._audit_accuracy = float(accuracies["audit"])
            self._update_drift()

    def set_audit_baseline(self, accuracy: float) -> None:
        """Record the original model's audit accuracy; drift is measured from it."""
        _check_ratio("audit baseline accuracy", accuracy)
        self.audit_baseline.set(accuracy)
        self._update_drift()

    def set_checkpoint(self, version: int, timestamp: float) -> None:
        """Record the checkpoint the daemon resumed from at start-up, before any fragment."""
        _check_count("version", version)
        _check_seconds("timestamp", timestamp)
        self.checkpoint_version.set(version)
        self.last_fragment_timestamp.set(timestamp)

    def count_request(self, outcome: str) -> None:
        """Count one handled deletion request."""
        _check_member("request outcome", outcome, REQUEST_OUTCOMES)
        self.requests.labels(outcome=outcome).inc()

    def count_abandoned(self, n: int = 1) -> None:
        """Count instances that left the retained set, goal out of reach."""
        _check_count("abandoned instances", n)
        self.abandoned.inc(n)

    def resume_counts(self, counts: Mapping[str, int]) -> None:
        """Continue the request counters from the ledger (rows per status) at start, so they never reset."""
        for outcome in REQUEST_OUTCOMES:
            if counts.get(outcome):
                self.requests.labels(outcome=outcome).inc(counts[outcome])
        if counts.get("abandoned"):
            self.count_abandoned(counts["abandoned"])

    def count_failure(self, kind: str) -> None:
        _check_member("failure kind", kind, FAILURE_KINDS)
        self.failures.labels(kind=kind).inc()

    def set_lag(self, messages: int) -> None:
        """Record how many requests wait on the requests topic."""
        _check_count("consumer lag", messages)
        self.consumer_lag.set(messages)

    def set_forgotten(self, instances: int) -> None:
        """Record the size of the retained forgotten set."""
        _check_count("forgotten instances", instances)
        self.forgotten_instances.set(instances)

    def set_vault(self, entries: int, oldest_age_seconds: float) -> None:
        """Record the forget vault's live entries and the age of the oldest one."""
        _check_count("vault entries", entries)
        _check_seconds("oldest entry age", oldest_age_seconds)
        self.vault_entries.set(entries)
        self.vault_oldest_age.set(oldest_age_seconds)

    def set_verify_window(self, seconds: float) -> None:
        _check_seconds("verify window", seconds)
        self.vault_window.set(seconds)

    def count_shreds(self, verified: bool, n: int = 1) -> None:
        """Count crypto-shreds (continued from the ledger's shred log at start)."""
        _check_count("shreds", n)
        self.vault_shreds.labels(verified="true" if verified else "false").inc(n)

    def observe_stage(self, stage: str, seconds: float) -> None:
        """Record one stage run outside `observe_fragment` (e.g. resolving one request)."""
        _check_member("stage", stage, STAGES)
        _check_seconds("seconds", seconds)
        self.stage_duration.labels(stage=stage).observe(seconds)

    def _update_drift(self) -> None:
        with self._audit_lock:
            baseline = self.audit_baseline.value
            if baseline is not None and self._audit_accuracy is not None:
                self.audit_drift.set(baseline - self._audit_accuracy)
