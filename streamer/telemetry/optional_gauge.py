"""A label-less Prometheus gauge that has no sample until it is first set."""
from __future__ import annotations

import threading
from collections.abc import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["OptionalGauge"]


class OptionalGauge(Collector):
    """A label-less gauge with no sample until it is first set (prometheus_client's `Gauge`
    always exposes 0). HELP and TYPE are exposed either way, like a labelled gauge with no
    children."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self._name = name
        self._documentation = documentation
        self._value: float | None = None
        self._lock = threading.Lock()
        registry.register(self)

    def set(self, value: float) -> None:
        with self._lock:
            self._value = float(value)

    @property
    def value(self) -> float | None:
        with self._lock:
            return self._value

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(self._name, self._documentation)]

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(self._name, self._documentation)
        value = self.value
        if value is not None:
            family.add_metric([], value)
        return [family]
