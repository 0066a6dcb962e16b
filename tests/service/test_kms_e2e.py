"""The vault's KEK in a KMS, end to end: `streamer run` as a subprocess against the test broker, its KEK a
key in a real KMS server (moto's, its own process over HTTP: conftest `aws_server`), rotated to another
KMS key with `streamer kek rotate`; a missing, disabled or foreign KMS key refuses the start."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aws_server import AwsServer
from daemon_harness import DaemonProcess, new_topics, produce, read_topic, train_digits, values, write_config
from streamer.config import KmsKeyConfig
from streamer.engine.data import load_splits
from streamer.intake.events import encode_event
from streamer.state.checkpoints import CheckpointStore
from streamer.state.kek import VaultKeyError
from streamer.state.kms import KmsKEK
from streamer.state.vault import KEYS_DIR, ForgetVault, read_index

TRAIN = load_splits("digits").train
NO_BROKER = {"requests": "r", "receipts": "c", "dead_letter": "d", "checkpoints": "k"}


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_digits(tmp_path_factory.mktemp("model") / "digits.pt")


def _kms_privacy(server: AwsServer, key: str) -> dict:
    return {"kek_file": None, "kek_kms": {"key_id": key, "endpoint_url": server.endpoint_url}}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamer", *args], capture_output=True, text=True, timeout=600)


def _error_line(out: subprocess.CompletedProcess) -> str:
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert lines[-1].startswith("streamer: error: "), lines[-1:]
    return lines[-1]


@pytest.mark.kafka
class TestDaemonOnKms:
    def test_a_kms_kek_serves_the_daemon_through_a_rotation(self, kafka_bootstrap: str, aws_server: AwsServer,
                                                            weights: Path, tmp_path: Path) -> None:
        """The daemon wraps a fragment's data keys with KMS key A; `kek rotate --to-kms B --destroy-old`
        moves them to B and schedules A's deletion; the daemon on A is then refused, `verify` and the
        daemon on B open the vault, every wrapped key opening under B only."""
        a, b = aws_server.create_kms_key("A"), aws_server.create_kms_key("B")
        topics = new_topics(kafka_bootstrap, "kms")
        config = write_config(tmp_path, kafka_bootstrap, topics, weights, privacy=_kms_privacy(aws_server, a))
        ids = [f"kms{i}" for i in range(4)]
        records = [(rid.encode(), encode_event(rid, "misclassify", int(TRAIN.y[i]), TRAIN.x[i])) for i, rid in
                   enumerate(ids)]
        daemon = DaemonProcess(config, tmp_path / "daemon-a.log")
        try:
            daemon.wait_for("partitions_assigned", timeout_s=120)
            produce(kafka_bootstrap, topics["requests"], records)
            daemon.wait_for("fragment_published", timeout_s=300)
            _, metrics = daemon.get("/metrics")
            assert daemon.stop() == 0
        finally:
            daemon.kill()
        assert 'streamer_kms_errors_total{operation="Encrypt"} 0.0' in metrics.splitlines()  # counted, none failed
        kms_a = KmsKEK(KmsKeyConfig(a, None, aws_server.endpoint_url))
        assert [e["key_id"] for e in daemon.events() if e["event"] == "vault_opened"] == [kms_a.key_id]
        vault = tmp_path / "checkpoints" / "vault"
        assert sorted(e.request_id for e in read_index(vault) if not e.shredded) == ids
        assert all(len(p.read_bytes()) > 40 for p in (vault / KEYS_DIR).iterdir())  # KMS blobs, not RFC 3394

        rotated = _cli("kek", "rotate", "--config", str(config), "--to-kms", b, "--kms-endpoint-url",
                       aws_server.endpoint_url, "--destroy-old")
        assert rotated.returncode == 0, rotated.stderr
        assert "4 live entries re-wrapped" in rotated.stdout and "deletes it on" in rotated.stdout
        refused = _error_line(_cli("run", "--config", str(config)))
        assert "PendingDeletion" in refused

        raw = yaml.safe_load(config.read_text())
        config.write_text(yaml.safe_dump({**raw, "privacy": {**raw["privacy"], **_kms_privacy(aws_server, b)}}))
        verified = _cli("verify", "--config", str(config))
        assert verified.returncode == 0 and "4 retained instances checked" in verified.stdout, verified.stdout
        daemon = DaemonProcess(config, tmp_path / "daemon-b.log")
        try:
            daemon.wait_for("partitions_assigned", timeout_s=120)
            assert daemon.stop() == 0
        finally:
            daemon.kill()
        kms_b = KmsKEK(KmsKeyConfig(b, None, aws_server.endpoint_url))
        assert [(e["key_id"], e["live"]) for e in daemon.events() if e["event"] == "vault_opened"] == [(kms_b.key_id, 4)]
        for path in (vault / KEYS_DIR).iterdir():
            kms_b.unwrap(path.read_bytes())
            with pytest.raises(VaultKeyError):
                kms_a.unwrap(path.read_bytes())  # the old key object, built before its deletion was scheduled
        assert sorted(r["request_id"] for r in values(read_topic(kafka_bootstrap, topics["receipts"], 4))) == ids


class TestKmsRefusal:
    @pytest.mark.parametrize("case", ["missing", "disabled", "another key"])
    def test_a_missing_disabled_or_foreign_kms_key_refuses_to_start(self, aws_server: AwsServer, weights: Path,
                                                                    tmp_path: Path, case: str) -> None:
        """The daemon exits 2 with one `streamer: error:` line naming the key, before it publishes anything."""
        key = aws_server.create_kms_key()
        if case == "missing":
            key, expected = "alias/streamer-test-no-such-key", "NotFoundException"
        elif case == "disabled":
            aws_server.client("kms").disable_key(KeyId=key.rsplit("/", 1)[1])
            expected = "is Disabled, not Enabled"
        else:  # the vault exists under another KMS key
            other = KmsKEK(KmsKeyConfig(aws_server.create_kms_key(), None, aws_server.endpoint_url))
            ForgetVault.open(tmp_path / "checkpoints" / "vault", other)
            expected = f"the KEK does not match the vault's (key id {other.key_id}; given key id kms:{key})"
        config = write_config(tmp_path, "127.0.0.1:1", NO_BROKER, weights, privacy=_kms_privacy(aws_server, key))
        line = _error_line(_cli("run", "--config", str(config)))
        assert expected in line and key in line, line
        assert CheckpointStore(tmp_path / "checkpoints").versions() == []
