"""Run the daemon as a real subprocess against a broker: config files, process control, topic I/O.

Used by tests/test_daemon_e2e.py and benchmarks/daemon_latency.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from kafka_broker import create_topics

# Caps small enough for a loaded 2-core CPU, large enough that digits fragments reach their goal.
FAST_UNLEARNING: dict[str, Any] = {
    "method": "default", "fragment_size": 4, "max_wait_s": 2.0, "max_steps": 300, "max_seconds": 120.0,
    "retain_forgotten": True, "lr": 0.003, "pgd_steps": 10, "n_adv": 4, "distill_batch": 32,
    "distill_weight": 1.0,
    # These caps trade accuracy for speed (16 requests take digits audit accuracy from 0.97 to
    # ~0.4): the utility floor is off here and tested on its own in test_failure_policy.py.
    "max_audit_drop": None,
}


# A configuration that keeps the served digits model useful with the guard rail on: the retain
# buffer (data.buffer: digits' buffer split), the default's distillation weight and lr 1e-3 (engine
# level, 16 requests in fragments of 4: audit accuracy 0.972 -> 0.894, about 3 s of unlearning).
USEFUL_UNLEARNING: dict[str, Any] = {
    "method": "default", "fragment_size": 4, "max_wait_s": 2.0, "max_steps": 600, "max_seconds": 120.0,
    "lr": 0.001, "pgd_steps": 10, "n_adv": 4, "distill_batch": 64, "distill_weight": 10.0,
    "max_audit_drop": 0.15,
}
AUDIT_FLOOR = 0.85  # what USEFUL_UNLEARNING keeps after 16 requests (0.894 measured; the base model: 0.972)


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} in a log line: not JSON")


def train_digits(out: Path, epochs: int = 12, seed: int = 0) -> Path:
    """The digits reference CNN trained for a few epochs (seconds), saved as a state_dict."""
    from streamer.engine.data import load_splits
    from streamer.engine.train import fit, reference_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 53k-parameter CNN: extra threads only fight the benchmark jobs for the CPU
    try:
        torch.manual_seed(seed)
        model = reference_model("digits")
        fit(model, load_splits("digits").train, epochs, seed=seed)
    finally:
        torch.set_num_threads(threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    return out


def new_topics(bootstrap: str, prefix: str, request_partitions: int = 1) -> dict[str, str]:
    """Four fresh topics: requests (`request_partitions` partitions), receipts, dead_letter,
    checkpoints (one partition each)."""
    tag = uuid.uuid4().hex[:10]
    topics = {name: f"{prefix}.{name}.{tag}" for name in ("requests", "receipts", "dead_letter", "checkpoints")}
    create_topics(bootstrap, [topics["requests"]], request_partitions)
    create_topics(bootstrap, [t for name, t in topics.items() if name != "requests"], 1)
    return topics


def write_config(directory: Path, bootstrap: str, topics: dict[str, str], weights: Path,
                 unlearning: dict[str, Any] | None = None, kafka: dict[str, Any] | None = None,
                 data: dict[str, Any] | None = None, fast: bool = True,
                 model: dict[str, Any] | None = None, privacy: dict[str, Any] | None = None,
                 checkpoints: dict[str, Any] | None = None) -> Path:
    """A config.yaml in `directory` with its own checkpoint dir, group, a free metrics port and a
    fresh KEK file (`directory/kek.key`, outside the checkpoint dir) for the forget vault.

    `unlearning` overrides FAST_UNLEARNING, or replaces it with fast=False (daemon and engine keys
    alike: each goes to its own section); `privacy` and `checkpoints` override keys of theirs."""
    from streamer.config.parse import ENGINE_KEYS
    from streamer.state.kek import generate_kek_file

    settings = {**(FAST_UNLEARNING if fast else {}), **(unlearning or {})}  # split into the two sections below
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / "kek.key").exists():
        generate_kek_file(directory / "kek.key")
    config = {
        "device": os.environ.get("STREAMER_TEST_DEVICE", "cpu"),  # ./run gpu-check: cuda
        "model": {"source": "reference:digits", "weights": str(weights), "num_classes": 10,
                  "input_shape": [1, 8, 8], "mean": [0.0], "std": [1.0], **(model or {})},
        "data": {"uri_roots": [str(directory / "data")], "max_payload_bytes": 1_000_000,
                 "datasets": {"digits": {"builtin": "digits", "split": "train"}},
                 "audit": {"builtin": "digits", "split": "audit"}, "buffer": None, **(data or {})},
        "unlearning": {k: v for k, v in settings.items() if k not in ENGINE_KEYS},
        "engine": {k: v for k, v in settings.items() if k in ENGINE_KEYS},
        "kafka": {"bootstrap_servers": bootstrap, "group_id": f"streamer.{uuid.uuid4().hex[:10]}",
                  "topics": topics, "client": {}, **(kafka or {})},
        "checkpoints": {"dir": "checkpoints", "keep": 0, **(checkpoints or {})},
        "privacy": {"kek_file": "kek.key", **(privacy or {})},
        "metrics": {"host": "127.0.0.1", "port": 0},
        "logging": {"level": "info"},
    }
    (directory / "data").mkdir(exist_ok=True)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class DaemonProcess:
    """`python -m streamer run --config PATH` with its JSON log lines captured in a file."""

    def __init__(self, config: Path, log_path: Path, crash_at: str | None = None, threads: int = 1,
                 env: dict[str, str] | None = None, hold_at: tuple[str, Path] | None = None, ranks: int = 1):
        """`crash_at`: SIGKILL at that point; `hold_at` (point, file): block there until the file
        exists, once per file (streamer/pipeline/faults.py); `ranks` > 1: under torchrun, that many
        processes on this host (rank 0 the daemon, the others its followers)."""
        self.config, self.log_path = config, log_path
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", **(env or {})}
        env.pop("STREAMER_CRASH_AT", None)
        env.pop("STREAMER_HOLD_AT", None)
        if crash_at:
            env["STREAMER_CRASH_AT"] = crash_at
        if hold_at:
            env["STREAMER_HOLD_AT"] = f"{hold_at[0]}:{hold_at[1]}"
        self._log = open(log_path, "ab")  # noqa: SIM115 (closed in wait)
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
                    if ranks > 1 else [sys.executable])
        self.process = subprocess.Popen(
            [*launcher, "-m", "streamer", "run", "--config", str(config)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env,
        )

    def events(self) -> list[dict[str, Any]]:
        """The daemon's JSON log lines, read strictly (a NaN or Infinity fails: RFC 8259 has none)."""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [json.loads(line, parse_constant=_not_json) for line in lines if line.startswith("{")]

    def wait_for(self, event: str, timeout_s: float = 60.0,
                 where: Callable[[dict[str, Any]], bool] = lambda e: True, count: int = 1) -> list[dict[str, Any]]:
        """Block until `count` log lines with this event (and predicate) exist; fail on exit or timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = [e for e in self.events() if e.get("event") == event and where(e)]
            if len(found) >= count:
                return found
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited ({self.process.returncode}) before {count} x {event}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {count} x {event} within {timeout_s} s:\n{self.tail()}")
            time.sleep(0.1)

    def metrics_port(self) -> int:
        return int(self.wait_for("metrics_serving")[-1]["port"])

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port()}{path}", timeout=5) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then wait for the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout_s)

    def wait(self, timeout_s: float = 60.0) -> int:
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"daemon did not exit within {timeout_s} s:\n{self.tail()}") from None
        finally:
            self._log.close()
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def run_until_crash(config: Path, log_path: Path, point: str, timeout_s: float = 180.0) -> DaemonProcess:
    """Run the daemon with STREAMER_CRASH_AT=`point` until it SIGKILLs itself there; asserts it did,
    once, at that point. Returns the exited process (for its events)."""
    daemon = DaemonProcess(config, log_path, crash_at=point)
    try:
        code = daemon.wait(timeout_s=timeout_s)
    finally:
        daemon.kill()
    assert code == -signal.SIGKILL, daemon.tail()
    assert [e["point"] for e in daemon.events() if e["event"] == "crash_hook"] == [point]
    return daemon


def with_tests_on_path() -> dict[str, str]:
    """Environment for a subprocess that imports test modules (e.g. `factory:user_models:build`)."""
    tests = str(Path(__file__).resolve().parent)
    return {"PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), tests) if p)}


def produce(bootstrap: str, topic: str, records: Iterable[tuple[bytes | None, bytes]],
            compression: str | None = None) -> None:
    """Send and flush; with `compression` (gzip, snappy, lz4, zstd) the records travel as compressed batches."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", compression_type=compression, linger_ms=50)
    try:
        for key, value in records:
            producer.send(topic, key=key, value=value)
        producer.flush(timeout=30)
    finally:
        producer.close()


def read_topic(bootstrap: str, topic: str, expected: int = 0, timeout_s: float = 30.0,
               settle_s: float = 1.0) -> list[ConsumerRecord]:
    """Every record of partition 0 of `topic`: at least `expected`, then whatever arrives within `settle_s`."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek(tp, 0)
    records: list[ConsumerRecord] = []
    deadline = time.monotonic() + timeout_s
    settle_until: float | None = None
    try:
        while True:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
            now = time.monotonic()
            if len(records) >= expected:
                settle_until = settle_until or now + settle_s
                if now >= settle_until:
                    return records
            elif now > deadline:
                raise AssertionError(f"{topic}: {len(records)} of {expected} records within {timeout_s} s")
    finally:
        consumer.close()


def values(records: Sequence[ConsumerRecord]) -> list[dict[str, Any]]:
    return [json.loads(r.value) for r in records]
