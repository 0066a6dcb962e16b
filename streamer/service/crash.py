"""Test hook: SIGKILL the daemon at a named point of the fragment pipeline (env STREAMER_CRASH_AT).

The crash tests use it to check exactly-once delivery around every durable step.
"""
from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import structlog

from ..errors import ConfigError

CRASH_ENV = "STREAMER_CRASH_AT"
# In the order a fragment passes them; after_shred: between a vault shred and its ledger row.
FRAGMENT_CRASH_POINTS = ("during_unlearn", "after_vault", "after_checkpoint", "after_ledger", "after_receipts")
CRASH_POINTS = (*FRAGMENT_CRASH_POINTS, "after_shred")

__all__ = ["CRASH_ENV", "CRASH_POINTS", "FRAGMENT_CRASH_POINTS", "CrashHook"]


@dataclass(frozen=True)
class CrashHook:
    """SIGKILL this process when `at(point)` names the configured point; a no-op otherwise."""

    point: str | None = None

    @staticmethod
    def from_env(environ: Mapping[str, str] = os.environ) -> CrashHook:
        point = environ.get(CRASH_ENV) or None
        if point is not None and point not in CRASH_POINTS:
            raise ConfigError(f"{CRASH_ENV}={point!r}: expected one of {', '.join(CRASH_POINTS)}")
        return CrashHook(point)

    def at(self, point: str) -> None:
        if point == self.point:
            structlog.get_logger("streamer.daemon").warning("crash_hook", point=point)
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
