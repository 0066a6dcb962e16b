"""Tests for streamer.state.kms: a KEK held by a KMS, over the AWS KMS API, against a real KMS server.

The server is moto's, as its own process over HTTP (conftest `aws_server`); boto3 talks to it as it
talks to AWS. The KEK interface's tests run against both implementations (a file's and a KMS's)."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from aws_server import AwsServer
from streamer.config import KmsKeyConfig
from streamer.state.kek import LocalKEK, VaultKeyError
from streamer.state.kms import KmsKEK
from streamer.state.vault import ForgetVault, VaultItem

SHAPE = (1, 8, 8)


def _kms(server: AwsServer, key_id: str) -> KmsKEK:
    return KmsKEK(KmsKeyConfig(key_id, None, server.endpoint_url))


@pytest.fixture(params=["file", "kms"])
def two_keks(request: pytest.FixtureRequest) -> tuple:
    """Two different KEKs of one implementation: a local (file/env) key or a KMS key."""
    if request.param == "file":
        return LocalKEK(bytes(range(32))), LocalKEK(bytes(range(1, 33)))
    server = request.getfixturevalue("aws_server")
    return _kms(server, server.create_kms_key()), _kms(server, server.create_kms_key())


class TestKeyEncryptionKeyInterface:
    """What the vault relies on, for every implementation."""

    def test_wrap_unwrap_round_trip(self, two_keks: tuple) -> None:
        """unwrap(wrap(dek)) == dek for random 32-byte DEKs; the wrapped bytes never contain the DEK."""
        kek, _ = two_keks
        for _ in range(3):
            dek = os.urandom(32)
            wrapped = kek.wrap(dek)
            assert kek.unwrap(wrapped) == dek and dek not in wrapped

    def test_another_key_refuses_to_unwrap(self, two_keks: tuple) -> None:
        """A DEK wrapped by one KEK does not come out of another: VaultKeyError, never other bytes."""
        kek, other = two_keks
        wrapped = kek.wrap(os.urandom(32))
        with pytest.raises(VaultKeyError, match="did not wrap this key"):
            other.unwrap(wrapped)

    def test_a_tampered_wrapped_key_is_refused(self, two_keks: tuple) -> None:
        kek, _ = two_keks
        wrapped = bytearray(kek.wrap(os.urandom(32)))
        wrapped[len(wrapped) // 2] ^= 0x01
        with pytest.raises(VaultKeyError):
            kek.unwrap(bytes(wrapped))

    def test_a_vault_opens_only_with_its_own_kek(self, two_keks: tuple, tmp_path: Path) -> None:
        """Entries round-trip bitwise through a vault under the KEK; the other KEK is refused at open,
        naming both key ids."""
        kek, other = two_keks
        x = torch.rand(SHAPE)
        ForgetVault.open(tmp_path / "vault", kek).put([VaultItem("r1", x, 3, -1)])
        xs, ys, _ = ForgetVault.open(tmp_path / "vault", kek, writer=False).get(["r1"])
        assert torch.equal(xs[0], x) and ys.tolist() == [3]
        with pytest.raises(VaultKeyError, match="does not match the vault's") as err:
            ForgetVault.open(tmp_path / "vault", other)
        assert kek.key_id in str(err.value) and other.key_id in str(err.value)


class TestKmsKEK:
    def test_key_id_is_the_arn_however_the_key_is_named(self, aws_server: AwsServer) -> None:
        """The key id, an alias and the ARN name the same KEK (key_id kms:ARN); the vault's key check
        records that, so an alias later moved to another key is refused as another KEK."""
        arn = aws_server.create_kms_key()
        aws_server.client("kms").create_alias(AliasName="alias/streamer-test-same", TargetKeyId=arn)
        ids = {_kms(aws_server, name).key_id for name in (arn, arn.rsplit("/", 1)[1], "alias/streamer-test-same")}
        assert ids == {f"kms:{arn}"}
        assert repr(_kms(aws_server, arn)) == f"KmsKEK(key_id='kms:{arn}')"

    def test_a_missing_or_disabled_key_is_refused(self, aws_server: AwsServer) -> None:
        """No such key: the KMS's NotFoundException; a disabled or deletion-pending key: refused before any
        use (its state named)."""
        with pytest.raises(VaultKeyError, match="NotFoundException"):
            _kms(aws_server, "alias/streamer-test-nowhere")
        kms = aws_server.client("kms")
        disabled, pending = aws_server.create_kms_key(), aws_server.create_kms_key()
        kms.disable_key(KeyId=disabled.rsplit("/", 1)[1])
        with pytest.raises(VaultKeyError, match="is Disabled, not Enabled"):
            _kms(aws_server, disabled)
        _kms(aws_server, pending).schedule_deletion(7)
        with pytest.raises(VaultKeyError, match="is PendingDeletion, not Enabled"):
            _kms(aws_server, pending)

    def test_an_unreachable_kms_or_no_region_is_one_clear_error(self, aws_server: AwsServer,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
        """Connection refused: a VaultKeyError naming the key and the endpoint, within seconds; no region
        anywhere: a VaultKeyError saying where to set it."""
        start = time.monotonic()
        with pytest.raises(VaultKeyError, match="127.0.0.1:9"):
            KmsKEK(KmsKeyConfig("alias/x", None, "http://127.0.0.1:9"))
        assert time.monotonic() - start < 30
        monkeypatch.delenv("AWS_REGION")
        monkeypatch.delenv("AWS_DEFAULT_REGION")
        with pytest.raises(VaultKeyError, match="privacy.kek_kms.region"):
            KmsKEK(KmsKeyConfig("alias/x", None, aws_server.endpoint_url))

    def test_an_outage_shorter_than_outage_s_is_ridden_out_and_counted(self, aws_server: AwsServer) -> None:
        """The KMS unreachable (its client pointed at a closed port) for ~2 s while a DEK is wrapped:
        the call is retried with a backoff and succeeds once the KMS is back; each failed try is reported."""
        kek = _kms(aws_server, aws_server.create_kms_key())
        errors: list[str] = []
        kek.on_error = errors.append
        good, kek._client = kek._client, _dead_client()
        back = threading.Timer(2.0, lambda: setattr(kek, "_client", good))
        back.start()
        try:
            dek = os.urandom(32)
            assert kek.unwrap(kek.wrap(dek)) == dek
        finally:
            back.cancel()
        assert errors and set(errors) == {"Encrypt"}

    def test_an_outage_longer_than_outage_s_fails_the_call_after_retrying(self, aws_server: AwsServer) -> None:
        """Unreachable for longer than outage_s: a VaultKeyError saying how long it was retried (the
        daemon then stops at that vault write and resumes when started again); a refusal that is not an
        outage (a blob no key wrapped) is not retried."""
        key = aws_server.create_kms_key()
        kek = KmsKEK(KmsKeyConfig(key, None, aws_server.endpoint_url, outage_s=6.0))  # boto3 itself tries 3 times (<= 3 s)
        wrapped = kek.wrap(os.urandom(32))
        errors: list[str] = []
        kek.on_error = errors.append
        good, kek._client = kek._client, _dead_client()
        with pytest.raises(VaultKeyError, match=r"127\.0\.0\.1:9.*retried for 6 s: privacy.kek_kms.outage_s"):
            kek.unwrap(wrapped)
        assert len(errors) >= 2 and set(errors) == {"Decrypt"}
        kek._client, errors[:] = good, []
        with pytest.raises(VaultKeyError, match="did not wrap this key"):
            kek.unwrap(b"\x01" * 180)
        assert errors == ["Decrypt"]

    def test_deletion_window_is_bounded_like_the_kms(self, aws_server: AwsServer) -> None:
        """ScheduleKeyDeletion takes 7-30 days; outside that the request is refused before any call."""
        kek = _kms(aws_server, aws_server.create_kms_key())
        for days in (6, 31):
            with pytest.raises(VaultKeyError, match="7-30 days"):
                kek.schedule_deletion(days)
        assert _state(aws_server, kek.arn) == "Enabled"
        kek.schedule_deletion(7)
        assert _state(aws_server, kek.arn) == "PendingDeletion"


def _dead_client():
    """A KMS client whose endpoint refuses connections (port 9, discard: nothing listens)."""
    from streamer.state.kms import _client

    return _client(KmsKeyConfig("alias/x", None, "http://127.0.0.1:9"))


def _state(server: AwsServer, arn: str) -> str:
    return server.client("kms").describe_key(KeyId=arn)["KeyMetadata"]["KeyState"]
