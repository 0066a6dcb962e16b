"""The utility budget between retrainings (pipeline/budget.py): deferred requests and their erasure
deadline, and "retrain advised" before the budget is reached."""
from __future__ import annotations

import structlog
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from streamer.pipeline.budget import DAY_S, UtilityBudget, deadline_of
from streamer.state.manifest import Manifest, parse_rfc3339
from streamer.telemetry.metrics import Metrics


def _manifest(version: str, audit: float, requests: int = 0, deferred: tuple = ()) -> Manifest:
    return Manifest(version=version, parent=None, created_at="2024-05-01T12:00:00.000Z",
                    requests=tuple({"request_id": f"{version}-{i}"} for i in range(requests)), offsets={},
                    metrics={"audit_accuracy": audit}, model_sha256="00" * 32, deferred=deferred)


def _budget(registry: CollectorRegistry, **kw) -> UtilityBudget:
    settings = dict(baseline=0.95, max_drop=0.1, advise_drift=0.05, training_set_size=None, advise_fraction=0.01,
                    deadline_days=30.0)
    settings.update(kw)
    return UtilityBudget(Metrics(registry), structlog.get_logger("test"), **settings)


def _value(registry: CollectorRegistry, name: str) -> float | None:
    return registry.get_sample_value(name)


class TestRetrainAdvised:
    def test_advised_at_the_drift_threshold_and_logged_once_each_way(self) -> None:
        registry = CollectorRegistry()
        budget = _budget(registry)
        with capture_logs() as logs:
            budget.start([_manifest("v000001", 0.93, requests=8)])
            budget.observe(_manifest("v000002", 0.905, requests=8))  # drift 0.045 < 0.05
            assert _value(registry, "streamer_retrain_advised") == 0.0
            budget.observe(_manifest("v000003", 0.899, requests=8))  # drift 0.051
            budget.observe(_manifest("v000004", 0.898, requests=8))
            assert _value(registry, "streamer_retrain_advised") == 1.0
        advised = [e for e in logs if e["event"] == "retrain_advised"]
        assert len(advised) == 1 and "audit drift 0.0510 >= 0.05" in advised[0]["reasons"][0]
        assert budget.applied_since_base == 32

    def test_the_forgotten_fraction_of_the_training_set(self) -> None:
        """With model.training_set_size the fraction is a gauge, and advice comes at retrain_advised_fraction."""
        registry = CollectorRegistry()
        budget = _budget(registry, training_set_size=1000, advise_drift=None)
        budget.start([_manifest("v000001", 0.95, requests=8)])
        assert _value(registry, "streamer_forgotten_fraction_ratio") == 0.008
        assert _value(registry, "streamer_retrain_advised") == 0.0
        budget.observe(_manifest("v000002", 0.95, requests=2))
        assert _value(registry, "streamer_forgotten_fraction_ratio") == 0.01
        assert _value(registry, "streamer_retrain_advised") == 1.0

    def test_deferred_requests_advise_and_show_their_earliest_deadline(self) -> None:
        """Deferred rows: counted, advised, and the gauge names the earliest deadline (received + 30 days,
        else the deferral's time); none: the deadline gauge is +Inf again (no deadline)."""
        registry = CollectorRegistry()
        budget = _budget(registry, advise_drift=None)
        rows = ({"request_id": "a", "received_at": "2024-05-01T00:00:00.000Z"},
                {"request_id": "b", "received_at": None, "deferred_at": "2024-04-20T00:00:00.000Z"})
        budget.start([_manifest("v000002", 0.95, deferred=rows)])
        assert _value(registry, "streamer_deferred_requests") == 2.0
        assert _value(registry, "streamer_retrain_advised") == 1.0
        assert _value(registry, "streamer_deferred_deadline_timestamp_seconds") == (
            parse_rfc3339("2024-04-20T00:00:00.000Z") + 30 * DAY_S)
        assert deadline_of(rows[0], 30.0) == parse_rfc3339("2024-05-01T00:00:00.000Z") + 30 * DAY_S
        budget.observe(_manifest("v000003", 0.95))
        assert _value(registry, "streamer_deferred_deadline_timestamp_seconds") == float("inf")  # no deadline
        assert _value(registry, "streamer_retrain_advised") == 0.0
