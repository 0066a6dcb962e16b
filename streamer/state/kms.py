"""A key-encryption key held by a KMS, over the AWS KMS API (boto3): the vault's third KEK source.

Each 32-byte DEK is wrapped by KMS `Encrypt` under the configured key and unwrapped by `Decrypt`
naming that key, both with a fixed encryption context (bound into the ciphertext and logged by
CloudTrail), so the key material never leaves the KMS and every unwrap is one audited call. The
key is resolved once with `DescribeKey`: its ARN is the key id the vault's key check records (an
alias that is later pointed at another key is another KEK), and a key that is not Enabled, or not
a symmetric encrypt/decrypt key, is refused before anything is wrapped.

boto3 is an optional dependency (`pip install 'streamer[aws]'`), imported only when a KMS KEK is
configured. Credentials come from boto3's chain (environment, shared files, instance or pod role),
never from streamer's config, manifests or logs; errors name the key and the KMS's error code.

A KMS that cannot be reached or throttles (a connection error or timeout; ThrottlingException,
KMSInternalException, DependencyTimeoutException) while the daemon wraps or unwraps is retried
with a backoff (1 s doubling to 30 s) for `privacy.kek_kms.outage_s` (default 300 s) before the
call fails; every failed call is reported to `on_error` (the daemon counts them in
`streamer_kms_errors_total{operation}`). Only DescribeKey at start is not retried beyond boto3's
own three attempts, so a wrong key or endpoint is refused at once.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from ..config import KmsKeyConfig
from .kek import KEY_BYTES, VaultKeyError

_CONTEXT = {"streamer": "forget-vault-dek"}  # KMS encryption context: a DEK wrapped for this purpose only
_WRONG_KEY = ("IncorrectKeyException", "InvalidCiphertextException", "AccessDeniedException")
_TRANSIENT = ("ThrottlingException", "KMSInternalException", "DependencyTimeoutException", "ServiceUnavailable",
              "RequestTimeout", "RequestTimeoutException")
_TIMEOUTS = {"connect_timeout": 5, "read_timeout": 15, "retries": {"mode": "standard", "max_attempts": 3}}
MIN_PENDING_DAYS, MAX_PENDING_DAYS = 7, 30  # KMS ScheduleKeyDeletion's PendingWindowInDays

__all__ = ["MAX_PENDING_DAYS", "MIN_PENDING_DAYS", "KmsKEK"]


class KmsKEK:
    """KeyEncryptionKey backed by a KMS key. key_id = "kms:" + the key's ARN. Raises VaultKeyError
    when boto3 is missing, the key cannot be described (absent, no permission, no region, the
    endpoint unreachable) or is not an Enabled symmetric ENCRYPT_DECRYPT key."""

    def __init__(self, config: KmsKeyConfig, client: Any = None, sleep: Callable[[float], None] = time.sleep):
        self.config = config
        self._client = client if client is not None else _client(config)
        self._sleep = sleep
        self.on_error: Callable[[str], None] = lambda operation: None  # a failed call (operation name)
        meta = self._call("DescribeKey", retry_for_s=0.0, KeyId=config.key_id)["KeyMetadata"]
        self.arn: str = meta["Arn"]
        self._key_uuid: str = meta.get("KeyId") or self.arn  # AWS takes either; moto 5.2's ScheduleKeyDeletion the id only
        self.key_id = f"kms:{self.arn}"
        state, usage = meta.get("KeyState", "Enabled"), meta.get("KeyUsage", "ENCRYPT_DECRYPT")
        spec = meta.get("KeySpec") or meta.get("CustomerMasterKeySpec") or "SYMMETRIC_DEFAULT"
        if state != "Enabled":
            raise VaultKeyError(f"{config.describe()} ({self.arn}) is {state}, not Enabled: it cannot wrap or "
                                "unwrap the vault's data keys")
        if usage != "ENCRYPT_DECRYPT" or spec != "SYMMETRIC_DEFAULT":
            raise VaultKeyError(f"{config.describe()} ({self.arn}) is a {spec} {usage} key; the vault needs a "
                                "SYMMETRIC_DEFAULT ENCRYPT_DECRYPT key")

    def __repr__(self) -> str:
        return f"KmsKEK(key_id={self.key_id!r})"

    def wrap(self, dek: bytes) -> bytes:
        """KMS Encrypt of a 32-byte DEK: the ciphertext blob (about 150-200 bytes on AWS)."""
        if len(dek) != KEY_BYTES:
            raise VaultKeyError(f"a DEK must be {KEY_BYTES} bytes, got {len(dek)}")
        return bytes(self._call("Encrypt", KeyId=self.arn, Plaintext=dek, EncryptionContext=_CONTEXT)["CiphertextBlob"])

    def unwrap(self, wrapped: bytes) -> bytes:
        """The DEK inside `wrapped`; VaultKeyError when KMS says this key did not wrap it (or cannot decrypt)."""
        plain = self._call("Decrypt", KeyId=self.arn, CiphertextBlob=wrapped, EncryptionContext=_CONTEXT,
                           EncryptionAlgorithm="SYMMETRIC_DEFAULT")["Plaintext"]
        if len(plain) != KEY_BYTES:
            raise VaultKeyError(f"KEK {self.key_id} unwrapped {len(plain)} bytes, not a {KEY_BYTES}-byte data key")
        return bytes(plain)

    def schedule_deletion(self, pending_days: int) -> datetime:
        """KMS ScheduleKeyDeletion: the key is unusable at once (PendingDeletion) and destroyed with its
        material after `pending_days` (7-30; CancelKeyDeletion undoes it until then). Returns the date."""
        if not MIN_PENDING_DAYS <= pending_days <= MAX_PENDING_DAYS:
            raise VaultKeyError(f"a KMS key's deletion window is {MIN_PENDING_DAYS}-{MAX_PENDING_DAYS} days, "
                                f"got {pending_days}")
        return self._call("ScheduleKeyDeletion", KeyId=self._key_uuid, PendingWindowInDays=pending_days)["DeletionDate"]

    def _call(self, operation: str, retry_for_s: float | None = None, **kwargs: Any) -> dict[str, Any]:
        """One KMS API call, retried while the KMS is unreachable or throttles, for `retry_for_s`
        (None: config.outage_s). Every failure becomes a VaultKeyError naming the key and the KMS's error code."""
        budget = self.config.outage_s if retry_for_s is None else retry_for_s
        deadline, delay = time.monotonic() + budget, 1.0
        while True:
            try:
                return self._attempt(operation, **kwargs)
            except _Transient as err:
                self.on_error(operation)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise VaultKeyError(f"{err} (retried for {budget:g} s: privacy.kek_kms.outage_s)") from err.__cause__
                self._sleep(min(delay, left))
                delay = min(2 * delay, 30.0)
            except VaultKeyError:
                self.on_error(operation)
                raise

    def _attempt(self, operation: str, **kwargs: Any) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
        from botocore.exceptions import ConnectionError as BotoConnectionError

        method = {"DescribeKey": "describe_key", "Encrypt": "encrypt", "Decrypt": "decrypt",
                  "ScheduleKeyDeletion": "schedule_key_deletion"}[operation]
        what = getattr(self, "key_id", None) or self.config.describe()
        try:
            return getattr(self._client, method)(**kwargs)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "?")
            message = err.response.get("Error", {}).get("Message", "")
            if operation == "Decrypt" and code in _WRONG_KEY:
                raise VaultKeyError(f"KEK {what} did not wrap this key, or may not unwrap it "
                                    f"(KMS {code}: {message})") from err
            if code in _TRANSIENT:
                raise _Transient(f"KMS {operation} on {what} failed: {code}: {message}") from err
            raise VaultKeyError(f"KMS {operation} on {what} failed: {code}: {message}") from err
        except (BotoConnectionError, HTTPClientError) as err:  # unreachable, timed out, connection closed
            raise _Transient(f"KMS {operation} on {self.config.describe()} failed: {err}") from err
        except BotoCoreError as err:  # no credentials, no region, ...
            raise VaultKeyError(f"KMS {operation} on {self.config.describe()} failed: {err}") from err


class _Transient(Exception):
    """A KMS call that may succeed if tried again (unreachable, throttled, the KMS's own fault)."""


def _client(config: KmsKeyConfig) -> Any:
    try:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError
    except ImportError as err:
        raise VaultKeyError("privacy.kek_kms needs boto3: pip install 'streamer[aws]'") from err
    try:
        return boto3.session.Session().client("kms", region_name=config.region, endpoint_url=config.endpoint_url,
                                              config=Config(**_TIMEOUTS))
    except BotoCoreError as err:  # NoRegionError above all
        raise VaultKeyError(f"cannot make a KMS client for {config.describe()}: {err} (set privacy.kek_kms.region "
                            "or AWS_REGION)") from err
