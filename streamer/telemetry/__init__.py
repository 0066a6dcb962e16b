"""What the daemon shows: Prometheus metrics, the /metrics, /healthz and /readyz server, JSON logs.

Public API: `Metrics` (every metric, on a registry passed in), `serve` / `MetricsServer`,
`configure_logging`.
"""
from .http import MetricsServer, serve
from .logs import configure_logging
from .metrics import FRAGMENT_OUTCOMES, Metrics

__all__ = ["FRAGMENT_OUTCOMES", "Metrics", "MetricsServer", "configure_logging", "serve"]
