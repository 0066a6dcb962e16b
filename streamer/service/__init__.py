"""The long-running service: the poll loop, the fragment pipeline, Kafka I/O, outputs, metrics.

Public API: `Daemon`, `run_daemon`, `Metrics`, `serve` (the /metrics, /healthz, /readyz server)
and the embedded broker (`Broker`) used by the demo and the tests.
"""
from .broker import Broker
from .daemon import Daemon, run_daemon
from .http import serve
from .metrics import Metrics

__all__ = ["Broker", "Daemon", "Metrics", "run_daemon", "serve"]
