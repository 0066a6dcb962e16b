"""The daemon's JSON log lines are strict JSON (RFC 8259): non-finite numbers become null."""
from __future__ import annotations

import json

import structlog

from streamer.telemetry.logs import configure_logging


def _refuse(constant: str) -> None:
    raise AssertionError(f"{constant} is not JSON")


def test_non_finite_numbers_are_null_in_json_lines(capsys) -> None:
    try:
        configure_logging("info", json=True)
        structlog.get_logger().info("fragment_published", accuracies={"fragment": float("nan"), "audit": 0.9},
                                    losses=[float("inf"), 1.0], pair=(float("-inf"),), steps=3)
        (line,) = capsys.readouterr().out.splitlines()
        event = json.loads(line, parse_constant=_refuse)
        assert event["accuracies"] == {"fragment": None, "audit": 0.9}
        assert (event["losses"], event["pair"], event["steps"]) == ([None, 1.0], [None], 3)
    finally:
        structlog.reset_defaults()
