"""Publish targets: where a version's files land for serving stacks to read.

S3 (any S3-compatible object store, boto3; credentials from boto3's usual chain: environment,
shared files, instance roles; never from streamer's config, manifests or logs). The layout is the
one serving stacks poll, per model name:

    <prefix>/<model>/<n>/<model file>, streamer.json   every version, n its integer number
                                                       (Triton's model repository; v000007 -> 7)
    <prefix>/<model>/<alias>/<model file>, streamer.json, VERSION
                                                       a copy of the version CURRENT names (KServe's
                                                       storageUri, a TorchServe loader); VERSION holds n

`streamer.json` is the serving manifest (mirror.serving_manifest): version, sha256, format and
metrics, no request ids or subjects.

A target's `put` is idempotent: writing a version again writes the same objects.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ..state import version_number

__all__ = ["PublishTarget", "S3Target", "TargetDown"]


class TargetDown(Exception):
    """A target could not take an upload now (unreachable, throttled, refused): retried later."""


class PublishTarget(Protocol):
    name: str

    alias_after_verify: bool

    def put_version(self, version: str, files: Mapping[str, bytes]) -> None: ...

    def put_alias(self, version: str, files: Mapping[str, bytes]) -> None: ...


@dataclass
class S3Target:
    """An S3 bucket; `client` is a boto3 S3 client (made by `of` from the target's settings)."""

    name: str
    bucket: str
    prefix: str
    model: str
    alias: str
    client: Any
    alias_after_verify: bool = False

    @staticmethod
    def of(settings: Mapping[str, Any]) -> S3Target:
        """A target from its config section (checkpoints.publish[i]). Raises ImportError without boto3."""
        import boto3  # the `aws` extra: only needed when an S3 target is configured
        from botocore.config import Config

        client = boto3.client("s3", endpoint_url=settings.get("endpoint_url"), region_name=settings.get("region"),
                              config=Config(retries={"max_attempts": 2}, connect_timeout=5, read_timeout=30))
        return S3Target(settings["name"], settings["bucket"], (settings.get("prefix") or "").strip("/"),
                        settings["model_name"], settings.get("alias", "current"), client,
                        bool(settings.get("alias_after_verify", False)))

    def put_version(self, version: str, files: Mapping[str, bytes]) -> None:
        self._put(str(version_number(version)), files)

    def put_alias(self, version: str, files: Mapping[str, bytes]) -> None:
        """The alias directory: the files, then VERSION last, so a reader that sees the new
        VERSION sees the new files."""
        self._put(self.alias, files)
        self._put(self.alias, {"VERSION": f"{version_number(version)}\n".encode()})

    def _put(self, directory: str, files: Mapping[str, bytes]) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        base = "/".join(p for p in (self.prefix, self.model, directory) if p)
        try:
            for name, data in files.items():
                self.client.put_object(Bucket=self.bucket, Key=f"{base}/{name}", Body=data)
        except (BotoCoreError, ClientError) as err:
            raise TargetDown(f"s3://{self.bucket}/{base}: {type(err).__name__}: {str(err)[:300]}") from err
