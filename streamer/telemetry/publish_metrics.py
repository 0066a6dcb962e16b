"""The publish targets' metrics (publish/mirror.py sets them): how far each target is behind."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["PublishMetrics"]


class PublishMetrics:
    """Registered on the daemon's registry by `Metrics` (`Metrics.publish`); `target` is a
    configured target's name (a closed set), never a version or a path."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.behind = Gauge(
            "streamer_publish_versions_behind", "Versions not yet uploaded to the publish target, plus 1 while its "
            "alias does not name CURRENT.", ["target"], registry=registry)
        self.failures = Counter(
            "streamer_publish_failures", "Upload attempts to the publish target that failed (retried with backoff).",
            ["target"], registry=registry)

    def targets(self, names: list[str]) -> None:
        """Pre-initialise each target's series (0 failures; behind unknown until the first pass)."""
        for name in names:
            self.failures.labels(target=name)

    def set_behind(self, target: str, versions: int) -> None:
        if versions < 0:
            raise ValueError(f"versions behind must be >= 0, got {versions}")
        self.behind.labels(target=target).set(versions)

    def failed(self, target: str) -> None:
        self.failures.labels(target=target).inc()
