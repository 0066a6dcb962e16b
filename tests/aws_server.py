"""A real S3- and KMS-protocol server for the tests: moto's server as its own process over HTTP.

`moto_server` (PyPI `moto[server]`) speaks the AWS APIs boto3 uses; the tests start it once per
session on a free port (`aws_endpoint` in conftest.py) and talk to it through boto3 exactly as
streamer talks to AWS, with throwaway credentials. Nothing is mocked in process.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REGION = "us-east-1"
# Throwaway credentials for the test server: set for the whole session, so that a developer's own
# AWS credentials or profile are never picked up by boto3's chain.
TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
            "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION, "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_EC2_METADATA_DISABLED": "true"}


class AwsServerError(RuntimeError):
    pass


class AwsServer:
    """`python -m moto.server -p PORT` on 127.0.0.1, its output in `log_path`."""

    def __init__(self, log_path: Path):
        self.log_path = log_path
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60.0) -> None:
        """Start it and wait until it answers HTTP. Raises AwsServerError with its last output."""
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
        self._process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise AwsServerError(f"moto_server exited with {self._process.returncode}: {self._tail()}")
            try:
                with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=2):
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise AwsServerError(f"moto_server did not answer on {self.endpoint_url} within {timeout_s} s: {self._tail()}")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._process is not None:
            self._log.close()
        self._process = None

    def client(self, service: str) -> Any:
        import boto3

        return boto3.session.Session().client(service, region_name=REGION, endpoint_url=self.endpoint_url)

    def objects(self, bucket: str) -> dict[str, bytes]:
        """Every object of `bucket`: key -> bytes."""
        s3 = self.client("s3")
        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
                for o in page.get("Contents", [])]
        return {key: s3.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}

    def create_kms_key(self, description: str = "streamer test KEK") -> str:
        """A new symmetric ENCRYPT_DECRYPT key; returns its ARN."""
        return self.client("kms").create_key(Description=description)["KeyMetadata"]["Arn"]

    def _tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
