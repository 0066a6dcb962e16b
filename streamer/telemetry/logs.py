"""structlog set-up: JSON lines when stdout is not a TTY, readable console lines when it is."""
from __future__ import annotations

import logging
import math
import sys
from typing import Any

import structlog


def _finite(value: Any) -> Any:
    """`value` with every non-finite float (NaN, +-Infinity) as None, in dicts, lists and tuples:
    JSON (RFC 8259 sec. 6) has no such numbers, and a strict reader refuses Python's `NaN`."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def configure_logging(level: str = "info", json: bool | None = None) -> None:
    """JSON lines (strict JSON: non-finite numbers are null) when `json` or stdout is not a TTY."""
    json = (not sys.stdout.isatty()) if json is None else json
    tail = [lambda _logger, _name, event: _finite(event), structlog.processors.JSONRenderer()] if json else \
        [structlog.dev.ConsoleRenderer()]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *tail,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,
    )
