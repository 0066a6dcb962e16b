"""Tests for streamer.service.metrics: the Metrics object and the /metrics, /healthz, /readyz server."""
from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from streamer.telemetry.metrics import (
    FAILURE_KINDS,
    FRAGMENT_OUTCOMES,
    REQUEST_OUTCOMES,
    STAGES,
    Metrics,
)
from streamer.telemetry.http import MetricsServer, serve

ALL_SAMPLE_NAMES = {
    "streamer_accuracy_ratio",
    "streamer_audit_accuracy_drift_ratio",
    "streamer_audit_accuracy_baseline_ratio",
    "streamer_requests_total",
    "streamer_fragments_total",
    "streamer_stage_duration_seconds_bucket",
    "streamer_stage_duration_seconds_count",
    "streamer_stage_duration_seconds_sum",
    "streamer_checkpoint_version",
    "streamer_consumer_lag_messages",
    "streamer_last_fragment_timestamp_seconds",
    "streamer_fragment_steps",
    "streamer_forgotten_instances",
    "streamer_vault_entries",
    "streamer_vault_oldest_entry_age_seconds",
    "streamer_vault_verify_window_seconds",
    "streamer_vault_shreds_total",
    "streamer_fragment_failures_total",
    "streamer_abandoned_instances_total",
}


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry)


def _fragment(metrics: Metrics, **overrides: object) -> None:
    kwargs: dict[str, object] = {
        "outcome": "goal",
        "steps": 37,
        "stage_seconds": {"adversarial": 1.5, "unlearn": 12.0, "checkpoint": 0.2},
        "accuracies": {"fragment": 0.0, "forgotten": 0.0, "audit": 0.93},
        "version": 4,
        "timestamp": 1_700_000_000.0,
    }
    kwargs.update(overrides)
    metrics.observe_fragment(**kwargs)  # type: ignore[arg-type]


def _populate(metrics: Metrics) -> None:
    metrics.set_audit_baseline(0.95)
    _fragment(metrics)
    metrics.count_request("forgotten")
    metrics.set_lag(3)
    metrics.set_forgotten(8)
    metrics.observe_stage("resolve", 0.02)


class TestCounters:
    def test_request_outcomes_start_at_zero(self, registry: CollectorRegistry, metrics: Metrics) -> None:
        """Every request outcome is exported as 0 before any request is counted."""
        for outcome in REQUEST_OUTCOMES:
            assert registry.get_sample_value("streamer_requests_total", {"outcome": outcome}) == 0.0

    def test_fragment_outcomes_start_at_zero(self, registry: CollectorRegistry, metrics: Metrics) -> None:
        """Every fragment outcome is exported as 0 before any fragment is observed."""
        for outcome in FRAGMENT_OUTCOMES:
            assert registry.get_sample_value("streamer_fragments_total", {"outcome": outcome}) == 0.0

    def test_count_request_increments_only_its_outcome(
        self, registry: CollectorRegistry, metrics: Metrics
    ) -> None:
        """count_request adds one to its own outcome and leaves the others at 0."""
        metrics.count_request("duplicate")
        metrics.count_request("duplicate")
        assert registry.get_sample_value("streamer_requests_total", {"outcome": "duplicate"}) == 2.0
        assert registry.get_sample_value("streamer_requests_total", {"outcome": "forgotten"}) == 0.0

    def test_stage_histograms_start_empty(self, registry: CollectorRegistry, metrics: Metrics) -> None:
        """Every stage's histogram exists with a zero count before any observation."""
        for stage in STAGES:
            assert registry.get_sample_value("streamer_stage_duration_seconds_count", {"stage": stage}) == 0.0


class TestObserveFragment:
    def test_records_outcome_steps_version_and_time(
        self, registry: CollectorRegistry, metrics: Metrics
    ) -> None:
        """A fragment sets the outcome counter, steps, checkpoint version and finish time."""
        _fragment(metrics, outcome="step_cap", steps=400, version=12, timestamp=1_700_000_123.5)
        assert registry.get_sample_value("streamer_fragments_total", {"outcome": "step_cap"}) == 1.0
        assert registry.get_sample_value("streamer_fragment_steps") == 400.0
        assert registry.get_sample_value("streamer_checkpoint_version") == 12.0
        assert registry.get_sample_value("streamer_last_fragment_timestamp_seconds") == 1_700_000_123.5

    def test_records_stage_durations_in_buckets(self, registry: CollectorRegistry, metrics: Metrics) -> None:
        """Each stage duration lands in the histogram of its stage, in the right bucket."""
        _fragment(metrics, stage_seconds={"unlearn": 42.0})
        assert registry.get_sample_value("streamer_stage_duration_seconds_count", {"stage": "unlearn"}) == 1.0
        assert registry.get_sample_value("streamer_stage_duration_seconds_sum", {"stage": "unlearn"}) == 42.0
        assert registry.get_sample_value(
            "streamer_stage_duration_seconds_bucket", {"stage": "unlearn", "le": "30.0"}
        ) == 0.0
        assert registry.get_sample_value(
            "streamer_stage_duration_seconds_bucket", {"stage": "unlearn", "le": "60.0"}
        ) == 1.0
        assert registry.get_sample_value("streamer_stage_duration_seconds_count", {"stage": "evaluate"}) == 0.0

    def test_buckets_span_10ms_to_30min(self, registry: CollectorRegistry, metrics: Metrics) -> None:
        """The stage histogram has finite buckets at 0.01 s and at 1800 s."""
        les = {
            s.labels["le"]
            for family in registry.collect()
            if family.name == "streamer_stage_duration_seconds"
            for s in family.samples
            if s.name.endswith("_bucket")
        }
        assert {"0.01", "1800.0", "+Inf"} <= les

    def test_sets_accuracies_per_set(self, registry: CollectorRegistry, metrics: Metrics) -> None:
        """Each given accuracy is exported under its set label."""
        _fragment(metrics, accuracies={"fragment": 0.125, "forgotten": 0.0, "audit": 0.9})
        assert registry.get_sample_value("streamer_accuracy_ratio", {"set": "fragment"}) == 0.125
        assert registry.get_sample_value("streamer_accuracy_ratio", {"set": "forgotten"}) == 0.0
        assert registry.get_sample_value("streamer_accuracy_ratio", {"set": "audit"}) == 0.9

    def test_audit_gauges_absent_without_audit_accuracy(
        self, registry: CollectorRegistry, metrics: Metrics
    ) -> None:
        """Without an audit accuracy, the audit, drift and baseline gauges have no sample at all."""
        _fragment(metrics, accuracies={"fragment": 0.0, "forgotten": 0.0})
        assert registry.get_sample_value("streamer_accuracy_ratio", {"set": "audit"}) is None
        assert registry.get_sample_value("streamer_audit_accuracy_drift_ratio") is None
        assert registry.get_sample_value("streamer_audit_accuracy_baseline_ratio") is None

    def test_drift_absent_until_baseline_known(self, registry: CollectorRegistry, metrics: Metrics) -> None:
        """An audit accuracy without a baseline exports the accuracy but no drift."""
        _fragment(metrics, accuracies={"audit": 0.9})
        assert registry.get_sample_value("streamer_accuracy_ratio", {"set": "audit"}) == 0.9
        assert registry.get_sample_value("streamer_audit_accuracy_drift_ratio") is None

    def test_drift_is_baseline_minus_current(self, registry: CollectorRegistry, metrics: Metrics) -> None:
        """Drift is the baseline audit accuracy minus the current audit accuracy."""
        metrics.set_audit_baseline(0.95)
        _fragment(metrics, accuracies={"audit": 0.875})
        assert registry.get_sample_value("streamer_audit_accuracy_baseline_ratio") == 0.95
        assert registry.get_sample_value("streamer_audit_accuracy_drift_ratio") == pytest.approx(0.075)

    def test_baseline_after_audit_updates_drift(self, registry: CollectorRegistry, metrics: Metrics) -> None:
        """Setting the baseline after an audit accuracy is known computes the drift at once."""
        _fragment(metrics, accuracies={"audit": 0.5})
        metrics.set_audit_baseline(0.75)
        assert registry.get_sample_value("streamer_audit_accuracy_drift_ratio") == 0.25

    def test_fragment_without_audit_keeps_last_drift(
        self, registry: CollectorRegistry, metrics: Metrics
    ) -> None:
        """A later fragment without an audit accuracy leaves the last audit and drift values as they were."""
        metrics.set_audit_baseline(1.0)
        _fragment(metrics, accuracies={"audit": 0.75})
        _fragment(metrics, accuracies={"fragment": 0.0})
        assert registry.get_sample_value("streamer_audit_accuracy_drift_ratio") == 0.25

    def test_invalid_fragment_records_nothing(self, registry: CollectorRegistry, metrics: Metrics) -> None:
        """A fragment with one bad field raises before any metric changes."""
        with pytest.raises(ValueError, match="'typo'"):
            _fragment(metrics, stage_seconds={"unlearn": 1.0, "typo": 2.0})
        assert registry.get_sample_value("streamer_fragments_total", {"outcome": "goal"}) == 0.0
        assert registry.get_sample_value("streamer_stage_duration_seconds_count", {"stage": "unlearn"}) == 0.0
        assert registry.get_sample_value("streamer_checkpoint_version") == 0.0


class TestGauges:
    def test_lag_forgotten_and_checkpoint(self, registry: CollectorRegistry, metrics: Metrics) -> None:
        """set_lag, set_forgotten and set_checkpoint set their gauges."""
        metrics.set_lag(17)
        metrics.set_forgotten(240)
        metrics.set_checkpoint(7, 1_700_000_000.0)
        assert registry.get_sample_value("streamer_consumer_lag_messages") == 17.0
        assert registry.get_sample_value("streamer_forgotten_instances") == 240.0
        assert registry.get_sample_value("streamer_checkpoint_version") == 7.0
        assert registry.get_sample_value("streamer_last_fragment_timestamp_seconds") == 1_700_000_000.0

    def test_vault_gauges_and_shreds(self, registry: CollectorRegistry, metrics: Metrics) -> None:
        """set_vault, set_verify_window and count_shreds set the vault's gauges and counter."""
        assert registry.get_sample_value("streamer_vault_shreds_total", {"verified": "false"}) == 0.0
        metrics.set_vault(12, 3600.0)
        metrics.set_verify_window(14 * 86_400.0)
        metrics.count_shreds(True, 3)
        metrics.count_shreds(False)
        assert registry.get_sample_value("streamer_vault_entries") == 12.0
        assert registry.get_sample_value("streamer_vault_oldest_entry_age_seconds") == 3600.0
        assert registry.get_sample_value("streamer_vault_verify_window_seconds") == 1_209_600.0
        assert registry.get_sample_value("streamer_vault_shreds_total", {"verified": "true"}) == 3.0
        assert registry.get_sample_value("streamer_vault_shreds_total", {"verified": "false"}) == 1.0
        with pytest.raises(ValueError):
            metrics.set_vault(-1, 0.0)

    def test_observe_stage(self, registry: CollectorRegistry, metrics: Metrics) -> None:
        """observe_stage adds one observation to its stage's histogram."""
        metrics.observe_stage("resolve", 0.02)
        assert registry.get_sample_value("streamer_stage_duration_seconds_count", {"stage": "resolve"}) == 1.0


class TestValidation:
    @pytest.mark.parametrize(
        ("call", "value"),
        [
            (lambda m: m.count_request("deleted"), "deleted"),
            (lambda m: m.observe_stage("train", 1.0), "train"),
            (lambda m: _fragment(m, outcome="success"), "success"),
            (lambda m: _fragment(m, stage_seconds={"warmup": 1.0}), "warmup"),
            (lambda m: _fragment(m, accuracies={"retain": 0.5}), "retain"),
        ],
    )
    def test_unknown_label_value_raises_naming_it(self, metrics: Metrics, call: object, value: str) -> None:
        """An unknown outcome, stage or set raises ValueError naming the value."""
        with pytest.raises(ValueError, match=repr(value)):
            call(metrics)  # type: ignore[operator]

    @pytest.mark.parametrize(
        "call",
        [
            lambda m: m.set_audit_baseline(1.5),
            lambda m: _fragment(m, accuracies={"audit": -0.1}),
            lambda m: _fragment(m, steps=-1),
            lambda m: m.set_lag(-3),
            lambda m: m.observe_stage("unlearn", float("nan")),
        ],
    )
    def test_out_of_range_values_raise(self, metrics: Metrics, call: object) -> None:
        """Ratios outside [0, 1], negative counts and non-finite durations raise ValueError."""
        with pytest.raises(ValueError):
            call(metrics)  # type: ignore[operator]

    def test_no_request_ids_as_labels(self, registry: CollectorRegistry, metrics: Metrics) -> None:
        """Only the closed label sets set, outcome, stage, kind, le and verified appear on any sample."""
        _populate(metrics)
        labels = {name for family in registry.collect() for s in family.samples for name in s.labels}
        assert labels <= {"set", "outcome", "stage", "kind", "le", "verified"}


def _get(server: MetricsServer, path: str) -> tuple[int, str, str]:
    url = f"http://127.0.0.1:{server.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


class TestServe:
    @pytest.fixture
    def state(self) -> dict[str, bool]:
        return {"health": True, "ready": False}

    @pytest.fixture
    def server(
        self, registry: CollectorRegistry, metrics: Metrics, state: dict[str, bool]
    ) -> Iterator[MetricsServer]:
        handle = serve(registry, "127.0.0.1", 0, lambda: state["health"], lambda: state["ready"])
        try:
            yield handle
        finally:
            handle.close()

    def test_port_zero_picks_a_free_port(self, server: MetricsServer) -> None:
        """Port 0 binds a real, non-zero port."""
        assert server.port > 0

    def test_metrics_parse_and_name_everything(self, server: MetricsServer, metrics: Metrics) -> None:
        """GET /metrics returns text that Prometheus' parser reads, with every streamer metric."""
        _populate(metrics)
        status, content_type, body = _get(server, "/metrics")
        assert status == 200
        assert content_type.startswith("text/plain")
        names = {s.name for family in text_string_to_metric_families(body) for s in family.samples}
        assert ALL_SAMPLE_NAMES <= names

    def test_scrape_without_audit_has_no_audit_samples(self, server: MetricsServer, metrics: Metrics) -> None:
        """A scrape before any audit accuracy carries no drift, baseline or audit-accuracy sample."""
        _fragment(metrics, accuracies={"fragment": 0.0, "forgotten": 0.0})
        _, _, body = _get(server, "/metrics")
        samples = [s for family in text_string_to_metric_families(body) for s in family.samples]
        names = {s.name for s in samples}
        assert "streamer_audit_accuracy_drift_ratio" not in names
        assert "streamer_audit_accuracy_baseline_ratio" not in names
        assert {s.labels["set"] for s in samples if s.name == "streamer_accuracy_ratio"} == {
            "fragment",
            "forgotten",
        }

    def test_healthz_follows_health(self, server: MetricsServer, state: dict[str, bool]) -> None:
        """/healthz answers 200 "ok" while health() is true and 503 once it is false."""
        assert _get(server, "/healthz")[0::2] == (200, "ok\n")
        state["health"] = False
        assert _get(server, "/healthz")[0] == 503

    def test_readyz_follows_ready(self, server: MetricsServer, state: dict[str, bool]) -> None:
        """/readyz answers 503 while ready() is false and 200 once it is true."""
        assert _get(server, "/readyz")[0] == 503
        state["ready"] = True
        assert _get(server, "/readyz")[0] == 200

    def test_probe_that_raises_is_unavailable(self, registry: CollectorRegistry) -> None:
        """A health callable that raises yields 503 instead of a broken connection."""

        def broken() -> bool:
            raise RuntimeError("boom")

        with serve(registry, "127.0.0.1", 0, broken, broken) as handle:
            assert _get(handle, "/healthz")[0] == 503

    def test_clients_that_hang_up_leave_no_traceback(self, server: MetricsServer, capsys) -> None:
        """Half-sent requests closed with a reset put nothing on stderr and the probes keep
        answering; an error that is not a closed connection is still reported."""
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        assert _get(server, "/healthz")[0] == 200
        for error in (BrokenPipeError(32, "Broken pipe"), ConnectionResetError(104, "reset")):
            try:
                raise error
            except ConnectionError:
                server._httpd.handle_error(None, ("127.0.0.1", 1))
        assert "Traceback" not in capsys.readouterr().err
        try:
            raise ValueError("a real bug")
        except ValueError:
            server._httpd.handle_error(None, ("127.0.0.1", 1))
        assert "ValueError: a real bug" in capsys.readouterr().err

    def test_unknown_path_is_404(self, server: MetricsServer) -> None:
        """Any other path answers 404."""
        assert _get(server, "/")[0] == 404
        assert _get(server, "/metrics/extra")[0] == 404

    def test_close_frees_the_port(self, registry: CollectorRegistry) -> None:
        """After close() the port can be bound again."""
        handle = serve(registry, "127.0.0.1", 0, lambda: True, lambda: True)
        port = handle.port
        handle.close()
        serve(registry, "127.0.0.1", port, lambda: True, lambda: True).close()

    @pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus)")
    def test_promtool_check_metrics(self, server: MetricsServer, metrics: Metrics) -> None:
        """`promtool check metrics` finds no problem in a scrape."""
        _populate(metrics)
        _, _, body = _get(server, "/metrics")
        result = subprocess.run(
            ["promtool", "check", "metrics"], input=body, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr


class TestSetAccuracies:
    def test_sets_gauges_and_drift_without_a_fragment(self):
        """set_accuracies fills the accuracy gauges and drift, and counts no fragment."""
        from prometheus_client import CollectorRegistry

        from streamer.telemetry.metrics import Metrics

        registry = CollectorRegistry()
        metrics = Metrics(registry)
        metrics.set_audit_baseline(0.9)
        metrics.set_accuracies({"forgotten": 0.0, "audit": 0.8})
        assert registry.get_sample_value("streamer_accuracy_ratio", {"set": "forgotten"}) == 0.0
        assert abs(registry.get_sample_value("streamer_audit_accuracy_drift_ratio") - 0.1) < 1e-9
        assert registry.get_sample_value("streamer_fragments_total", {"outcome": "goal"}) == 0.0
        assert registry.get_sample_value("streamer_accuracy_ratio", {"set": "fragment"}) is None


class TestFailureCounters:
    def test_failure_kinds_are_closed_and_start_at_zero(self, registry: CollectorRegistry, metrics: Metrics) -> None:
        """Every failure kind is exported at 0 before any failure; an unknown kind is refused."""
        for kind in FAILURE_KINDS:
            assert registry.get_sample_value("streamer_fragment_failures_total", {"kind": kind}) == 0
        metrics.count_failure("non_finite")
        assert registry.get_sample_value("streamer_fragment_failures_total", {"kind": "non_finite"}) == 1
        with pytest.raises(ValueError):
            metrics.count_failure("request-42")
