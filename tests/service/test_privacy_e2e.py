"""Data protection end to end: `streamer run` as a subprocess against the real test broker, with real files
and real crypto. Deleted instances exist only encrypted in the vault, windows close and shred, rollback
replays from the vault after the requests topic lost its records, a wrong or missing KEK refuses the
start, and kill -9 around the vault write and the shred keeps exactly-once."""
from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from kafka import KafkaAdminClient

from daemon_harness import DaemonProcess, new_topics, run_until_crash, produce, read_topic, train_digits, values, write_config
from streamer.config import load_config
from streamer.engine.data import load_splits
from streamer.engine.evaluate import predict
from streamer.engine.models import published_model
from streamer.intake.events import encode_event
from streamer.kafka.broker import create_topics
from streamer.state.checkpoints import CheckpointStore
from streamer.state.kek import generate_kek_file, kek_from_file
from streamer.state.ledger import LEDGER_FILE, Ledger
from streamer.state.outcome import APPLIED
from streamer.state.shreds import ShredLog
from streamer.state.vault import DATA_DIR, KEYS_DIR, ForgetVault, read_index

TRAIN = load_splits("digits").train


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_digits(tmp_path_factory.mktemp("model") / "digits.pt")


def _image(index: int) -> torch.Tensor:
    """TRAIN.x[index] plus a little noise, so that every 16 bytes of it are distinctive on disk."""
    g = torch.Generator().manual_seed(1000 + index)
    return (TRAIN.x[index] + 0.002 + 0.05 * torch.rand(TRAIN.x[index].shape, generator=g)).clamp(0.0, 1.0)


def _events(prefix: str, indices: range) -> tuple[list[tuple[bytes, bytes]], dict[str, torch.Tensor]]:
    images = {f"{prefix}{i}": _image(i) for i in indices}
    return [(rid.encode(), encode_event(rid, "misclassify", int(TRAIN.y[i]), images[rid], subject=f"person-{i % 2}"))
            for rid, i in zip(images, indices)], images


def _encodings(x: torch.Tensor) -> list[bytes]:
    """How an image's pixels could sit on disk: float32, uint8 and the base64 of the event's float32 bytes."""
    raw = x.numpy().astype("<f4").tobytes()
    return [raw, (x * 255).round().to(torch.uint8).numpy().tobytes(), base64.b64encode(raw)]


def _leaks(files: list[Path], secret: bytes, width: int = 16) -> list[str]:
    chunks = [secret[i:i + width] for i in range(0, len(secret) - width + 1, width)]
    return [str(p) for p in files if any(c in p.read_bytes() for c in chunks)]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamer", *args], capture_output=True, text=True, timeout=600)


def _current_model(config: Path) -> torch.nn.Module:
    """CURRENT's model file, loaded as its user loads it (sha256 checked by the store)."""
    cfg = load_config(config)
    store = CheckpointStore(cfg.checkpoints.dir)
    model_file = store.load(store.current_version() or "").model
    assert model_file is not None
    return published_model(cfg.model, model_file.data, model_file.format, "cpu")


def _applied_once(checkpoint_dir: Path, ids: set[str]) -> None:
    """Every id is applied in exactly one version of CURRENT's lineage, and the ledger's standing rows agree."""
    store = CheckpointStore(checkpoint_dir)
    lineage = store.lineage(store.current_version() or "")
    applied = Counter(e["request_id"] for m in lineage for e in m.requests)
    assert set(applied) == ids and set(applied.values()) == {1}, applied
    with Ledger(checkpoint_dir / LEDGER_FILE) as ledger:
        standing = {rid: ledger.applied(rid) for rid in ids}
    assert standing == {e["request_id"]: m.version for m in lineage for e in m.requests}


@pytest.mark.kafka
class TestDataProtection:
    def test_no_plaintext_on_disk_and_windows_shred(self, kafka_bootstrap: str, weights: Path, tmp_path: Path) -> None:
        """After a run no file under the run's directory (checkpoints, ledger, vault, log) holds a sent image;
        the window (1 later version) closes, the first fragment is shredded, verify reports it as neither
        pass nor fail, erasure-report shows every request with its window, and the gauges count it."""
        topics = new_topics(kafka_bootstrap, "privacy")
        config = write_config(tmp_path, kafka_bootstrap, topics, weights,
                              privacy={"verify_window": {"days": 14, "fragments": 1}})
        records, images = _events("pv", range(30, 38))
        daemon = DaemonProcess(config, tmp_path / "daemon.log")
        try:
            daemon.wait_for("partitions_assigned", timeout_s=90)
            produce(kafka_bootstrap, topics["requests"], records)
            daemon.wait_for("request_shredded", count=4, timeout_s=300)
            metrics = daemon.get("/metrics")[1]
            assert daemon.stop() == 0
        finally:
            daemon.kill()
        checkpoints = tmp_path / "checkpoints"
        files = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "kek.key"]
        assert any(p.parent.name == DATA_DIR for p in files) and (checkpoints / LEDGER_FILE) in files
        assert not list(checkpoints.rglob("forgotten.pt"))
        control = tmp_path / "control"  # the scan finds the images where they are: as forgotten.pt held them, in events
        control.mkdir()
        stacked = torch.stack(list(images.values()))
        torch.save({"x": stacked, "u8": (stacked * 255).round().to(torch.uint8)}, control / "forgotten.pt")
        (control / "events.jsonl").write_bytes(b"\n".join(value for _, value in records))
        control_files = sorted(control.iterdir())
        for rid, x in images.items():
            for secret in _encodings(x):
                assert _leaks(control_files, secret), "the scan cannot see the pixels"
                assert _leaks(files, secret) == [], rid

        first, second = [f"pv{i}" for i in range(30, 34)], [f"pv{i}" for i in range(34, 38)]
        with ShredLog(checkpoints / LEDGER_FILE) as log:
            rows = log.rows()
        assert sorted(rows) == first and {r.verified_version for r in rows.values()} == {"v000002"}
        index = {e.request_id: e for e in read_index(checkpoints / "vault")}
        assert sorted(rid for rid, e in index.items() if e.shredded) == first
        assert sorted(rid for rid, e in index.items() if not e.shredded) == second
        assert len(list((checkpoints / "vault" / KEYS_DIR).iterdir())) == 4
        assert len(list((checkpoints / "vault" / DATA_DIR).iterdir())) == 4
        assert 'streamer_vault_shreds_total{verified="true"} 4.0' in metrics
        assert "streamer_vault_entries 4.0" in metrics

        verified = _cli("verify", "--config", str(config))
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert "SHREDDED: 4 requests" in verified.stdout and "pv30 verified until v000002, shredded at" in verified.stdout
        assert "4 retained instances checked" in verified.stdout

        report = json.loads(_cli("erasure-report", "--config", str(config), "--json").stdout)
        by_id = {r["request_id"]: r for r in report["requests"]}
        assert sorted(by_id) == sorted(images)
        assert all(by_id[rid]["shredded"]["verified_until"] == "v000002" for rid in first)
        assert all(by_id[rid]["window"]["state"] == "open" and by_id[rid]["window"]["closes_after_version"] == "v000003"
                   for rid in second)
        assert not any("vault" in c["where"] for rid in first for c in by_id[rid]["copies"])
        assert all(by_id[rid]["received_at"] and by_id[rid]["received_at"] <= by_id[rid]["applied_at"] for rid in by_id)
        assert all(any(c["where"].startswith(f"record {topics['requests']}[0]@") for c in by_id[rid]["copies"])
                   for rid in by_id)
        person = json.loads(_cli("erasure-report", "--config", str(config), "--json", "--subject", "person-1").stdout)
        assert sorted(r["request_id"] for r in person["requests"]) == [f"pv{i}" for i in range(31, 38, 2)]

    def test_rollback_replays_from_the_vault_when_the_topic_lost_its_records(
            self, kafka_bootstrap: str, weights: Path, tmp_path: Path) -> None:
        """With the requests topic deleted and recreated empty (Tansu cannot delete records; a deleted topic has
        none), rolling back behind shredded requests is refused naming them, and rolling back behind live ones
        re-applies them from the vault: new versions, new receipts, every request once in the lineage."""
        topics = new_topics(kafka_bootstrap, "vaultrb")
        config = write_config(tmp_path, kafka_bootstrap, topics, weights,
                              privacy={"verify_window": {"days": 14, "fragments": 2}})
        records, images = _events("rb", range(40, 52))
        ids = set(images)
        produce(kafka_bootstrap, topics["requests"], records)
        daemon = DaemonProcess(config, tmp_path / "daemon.log")
        try:
            daemon.wait_for("request_shredded", count=4, timeout_s=420)  # rb40..43, after v000003
            assert daemon.stop() == 0
        finally:
            daemon.kill()
        admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        try:
            admin.delete_topics([topics["requests"]])
        finally:
            admin.close()
        create_topics(kafka_bootstrap, [topics["requests"]], 1)
        assert read_topic(kafka_bootstrap, topics["requests"], 0, settle_s=2.0) == []

        daemon = DaemonProcess(config, tmp_path / "daemon2.log")
        try:
            daemon.wait_for("partitions_assigned", timeout_s=90)
            refused = _cli("rollback", "--to", "v000000", "--config", str(config))
            assert refused.returncode == 1 and "crypto-shredded" in refused.stdout
            assert all(f"rb{i}" in refused.stdout for i in range(40, 44))
            done = _cli("rollback", "--to", "v000001", "--config", str(config))
            assert done.returncode == 0, done.stdout + done.stderr
            assert "published v000004 = weights of v000001" in done.stdout and "from the forget vault" in done.stdout
            daemon.wait_for("fragment_published", where=lambda e: e.get("version") == "v000006", timeout_s=420)
            assert daemon.stop() == 0
        finally:
            daemon.kill()
        store = CheckpointStore(tmp_path / "checkpoints")
        assert [m.version for m in store.lineage("v000006")] == ["v000006", "v000005", "v000004", "v000001", "v000000"]
        assert store.manifest("v000004").replay and not store.manifest("v000006").replay
        _applied_once(tmp_path / "checkpoints", ids)
        receipts = values(read_topic(kafka_bootstrap, topics["receipts"], 20))
        versions = {rid: [r["version"] for r in receipts if r["request_id"] == rid] for rid in ids}
        assert all(len(versions[f"rb{i}"]) == 1 for i in range(40, 44))
        assert all(versions[f"rb{i}"][-1] in ("v000005", "v000006") and len(versions[f"rb{i}"]) == 2
                   for i in range(44, 52))
        replayed = torch.stack([images[f"rb{i}"] for i in range(44, 52)])
        assert (predict(_current_model(config), replayed) != TRAIN.y[44:52]).all()
        ok = _cli("verify", "--config", str(config))
        assert ok.returncode == 0 and "SHREDDED: 4 requests" in ok.stdout, ok.stdout + ok.stderr

    def test_kill_9_around_the_vault_write_and_the_shred_keeps_exactly_once(
            self, kafka_bootstrap: str, weights: Path, tmp_path: Path) -> None:
        """kill -9 after the vault write (before the publish) and after a shred (before its ledger row), then a
        clean run: each request applied once, the vault holds exactly CURRENT's live retained set, every shred
        is in the ledger, one receipt per request."""
        topics = new_topics(kafka_bootstrap, "vaultcrash")
        config = write_config(tmp_path, kafka_bootstrap, topics, weights,
                              privacy={"verify_window": {"days": 14, "fragments": 1}})
        records, images = _events("kc", range(60, 68))
        produce(kafka_bootstrap, topics["requests"], records)
        vault_dir = tmp_path / "checkpoints" / "vault"
        for run, point in enumerate(("after_vault", "after_shred")):
            daemon = run_until_crash(config, tmp_path / f"run{run}.log", point, timeout_s=420)
            if point == "after_vault":  # the fragment's entries are in the vault, no version references them
                assert len([e for e in read_index(vault_dir) if not e.shredded]) == 4
                assert CheckpointStore(tmp_path / "checkpoints").versions() == ["v000000"]
        orphans = [e for e in daemon.events() if e["event"] == "vault_orphans_removed"]
        assert [sorted(e["request_ids"]) for e in orphans] == [[f"kc{i}" for i in range(60, 64)]]

        daemon = DaemonProcess(config, tmp_path / "final.log")
        try:
            daemon.wait_for("partitions_assigned", timeout_s=120)
            assert daemon.stop() == 0
        finally:
            daemon.kill()
        # the keys were destroyed before the crash, the ledger rows were not: written on start from the vault
        assert [e["request_ids"] for e in daemon.events() if e["event"] == "shreds_recorded_on_start"] == [
            [f"kc{i}" for i in range(60, 64)]]
        assert not [e for e in daemon.events() if e["event"] == "request_shredded"]
        _applied_once(tmp_path / "checkpoints", set(images))
        store = CheckpointStore(tmp_path / "checkpoints")
        current = store.manifest(store.current_version() or "")
        index = read_index(vault_dir)
        live = {e.request_id for e in index if not e.shredded}
        assert live == {f"kc{i}" for i in range(64, 68)} and len(index) == 8
        assert live <= {r.request_id for r in current.retained}
        assert len(list((vault_dir / KEYS_DIR).iterdir())) == len(list((vault_dir / DATA_DIR).iterdir())) == 4
        with ShredLog(tmp_path / "checkpoints" / LEDGER_FILE) as log:
            rows = log.rows()
        assert sorted(rows) == [f"kc{i}" for i in range(60, 64)]
        assert all(r.verified_version == "v000002" and "recorded on start" in r.reason for r in rows.values())
        with Ledger(tmp_path / "checkpoints" / LEDGER_FILE) as ledger:
            assert Counter(r.outcome.status for r in ledger.rows() if r.outcome.status in APPLIED) == {"forgotten": 8}
        receipts = values(read_topic(kafka_bootstrap, topics["receipts"], 8))
        assert sorted(r["request_id"] for r in receipts) == sorted(images)


class TestKekRefusal:
    @pytest.mark.parametrize("case", ["missing file", "wrong key", "unset variable"])
    def test_a_missing_or_wrong_kek_refuses_to_start(self, weights: Path, tmp_path: Path, case: str) -> None:
        """The daemon exits 2 with one `streamer: error:` line naming the problem, before it publishes anything."""
        privacy = {"missing file": {"kek_file": "nowhere/kek.key"}, "wrong key": {},
                   "unset variable": {"kek_file": None, "kek_env": "STREAMER_TEST_UNSET_KEK"}}[case]
        config = write_config(tmp_path, "127.0.0.1:1", {"requests": "r", "receipts": "c", "dead_letter": "d",
                                                        "checkpoints": "k"}, weights, privacy=privacy)
        ids: list[str] = []
        if case == "wrong key":  # the vault exists, made with another KEK
            vault_kek = generate_kek_file(tmp_path / "other.key")
            ForgetVault.open(tmp_path / "checkpoints" / "vault", vault_kek)
            ids = [vault_kek.key_id, kek_from_file(tmp_path / "kek.key").key_id]
        out = subprocess.run([sys.executable, "-m", "streamer", "run", "--config", str(config)],
                             capture_output=True, text=True, timeout=300)
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        expected = {"missing file": "cannot read the KEK file", "wrong key": "the KEK does not match the vault's",
                    "unset variable": "environment variable STREAMER_TEST_UNSET_KEK is not set"}[case]
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert lines[-1].startswith("streamer: error: ") and expected in lines[-1], lines[-1:]
        assert CheckpointStore(tmp_path / "checkpoints").versions() == []
        assert all(key_id in lines[-1] for key_id in ids)  # both key ids, never key material
