"""A real MLflow tracking and model-registry server for the tests: `mlflow server` as its own
process over HTTP, SQLite backend store and a proxied artifact store in a temporary directory
(the `test` extra installs mlflow). Started once per test session (tests/conftest.py)."""
from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from aws_server import free_port


class MlflowServer:
    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120.0) -> MlflowServer:
        """Start it and wait for /health; raises RuntimeError with its log tail if it does not answer."""
        log = open(self.root / "mlflow-server.log", "ab")  # noqa: SIM115 (closed by the child's exit)
        self._process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        tail = (self.root / "mlflow-server.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"mlflow server did not answer on {self.uri}:\n{tail}")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
