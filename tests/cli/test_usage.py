"""Usage errors are one `streamer: error: ...` line on stderr, exit status 2, like every other failure."""
from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("argv", [["nosuch"], ["rebase", "--config", "c"], ["produce", "--config", "c", "--dataset", "d"],
                                  ["broker", "--port", "70000"], ["verify", "--config", "c", "--reference", "r"], []])
def test_one_line(argv: list[str]) -> None:
    out = subprocess.run([sys.executable, "-m", "streamer", *argv], capture_output=True, text=True, timeout=60)
    lines = out.stderr.splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("streamer: error: "), out.stderr
    assert "(usage: streamer" in lines[0] and out.stdout == ""
