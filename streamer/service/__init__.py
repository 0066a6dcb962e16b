"""The long-running service: the poll loop, start-up recovery and the parts it runs.

Public API: `Daemon` (built whole by its constructor), `run_daemon` (signals, fault points armed
from the environment), `Services` and `recover`.
"""
from .daemon import Daemon, run_daemon
from .recovery import Recovered, recover
from .services import Services

__all__ = ["Daemon", "Recovered", "Services", "recover", "run_daemon"]
