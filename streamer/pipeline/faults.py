"""Fault injection for the delivery-guarantee tests: named points a test can crash or hold at.

    STREAMER_CRASH_AT=<point>          SIGKILL this process when it reaches <point>
    STREAMER_HOLD_AT=<point>:<file>    block at <point> until <file> exists (then remove it: one
                                       release per hold) or the fragment is cancelled

`arm()` reads them once (`run_daemon` calls it); until then, and without them, `crash_at` and
`hold_at` do nothing. Production classes take no argument for this: the points are called where
the durable steps are (the commit, commit.py) and where a fragment runs (the worker thread);
`streamer kek rotate` arms them too and hands `crash_at` to the rotation (state/rotation.py).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import structlog

from ..errors import ConfigError
from ..state import ROTATION_CRASH_POINTS

CRASH_ENV = "STREAMER_CRASH_AT"
HOLD_ENV = "STREAMER_HOLD_AT"
# In the order a fragment passes them; after_shred: between a vault shred and its ledger row.
FRAGMENT_CRASH_POINTS = ("during_unlearn", "after_vault", "after_checkpoint", "after_ledger", "after_receipts")
REBASE_CRASH_POINTS = ("rebase_after_publish", "rebase_after_ledger")  # inside `streamer rebase` run by the daemon
# inside `streamer kek rotate` (state/rotation.py names and orders them; the command arms them too)
CRASH_POINTS = (*FRAGMENT_CRASH_POINTS, "after_shred", *REBASE_CRASH_POINTS, *ROTATION_CRASH_POINTS)
HOLD_POINTS = ("during_unlearn",)  # the worker thread, before the engine runs
_HOLD_POLL_S = 0.05

__all__ = ["CRASH_ENV", "CRASH_POINTS", "FRAGMENT_CRASH_POINTS", "HOLD_ENV", "HOLD_POINTS", "REBASE_CRASH_POINTS",
           "ROTATION_CRASH_POINTS", "arm",
           "crash_at",
           "disarm", "hold_at"]

_crash: str | None = None
_hold: tuple[str, Path] | None = None


def arm(environ: Mapping[str, str] = os.environ) -> None:
    """Read the crash and hold points from the environment. Raises ConfigError for an unknown
    point or a hold without its release file."""
    global _crash, _hold
    crash = environ.get(CRASH_ENV) or None
    if crash is not None and crash not in CRASH_POINTS:
        raise ConfigError(f"{CRASH_ENV}={crash!r}: expected one of {', '.join(CRASH_POINTS)}")
    hold = environ.get(HOLD_ENV) or None
    held = None
    if hold is not None:
        point, _, release = hold.partition(":")
        if point not in HOLD_POINTS or not release:
            raise ConfigError(f"{HOLD_ENV}={hold!r}: expected POINT:RELEASE_FILE, POINT one of {', '.join(HOLD_POINTS)}")
        held = (point, Path(release))
    _crash, _hold = crash, held


def disarm() -> None:
    global _crash, _hold
    _crash, _hold = None, None


def armed() -> tuple[str | None, str | None]:
    """(crash point, hold point) as armed."""
    return _crash, None if _hold is None else _hold[0]


def crash_at(point: str) -> None:
    """SIGKILL this process if `point` is the armed crash point."""
    if point == _crash:
        structlog.get_logger("streamer.daemon").warning("crash_hook", point=point)
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def hold_at(point: str, cancel: threading.Event) -> None:
    """At the armed hold point, block until its release file appears (and remove it) or `cancel`
    is set: a stage exactly as slow as a test needs, without a wall-clock guess."""
    if _hold is None or _hold[0] != point:
        return
    structlog.get_logger("streamer.daemon").info("hold_hook", point=point, release=str(_hold[1]))
    while not cancel.is_set():
        try:
            _hold[1].unlink()  # released: the next pass holds again
            return
        except FileNotFoundError:
            time.sleep(_HOLD_POLL_S)
