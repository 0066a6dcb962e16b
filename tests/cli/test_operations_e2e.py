"""Operator commands end to end against the real broker: rollback with replay (daemon running and
stopped), verify, checkpoints list/show, produce."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from daemon_harness import DaemonProcess, new_topics, read_topic, train_digits, write_config
from streamer.state.checkpoints import CheckpointStore
from streamer.config import load_config
from streamer.engine.data import load_splits
from streamer.state.ledger import Ledger
from streamer.state.ledger import LEDGER_FILE

pytestmark = pytest.mark.kafka

TRAIN = load_splits("digits").train


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamer", *args], capture_output=True, text=True,
                          timeout=timeout)


def _receipts(bootstrap: str, topic: str, expected: int) -> list[dict]:
    return [json.loads(r.value) for r in read_topic(bootstrap, topic, expected, timeout_s=240)]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return train_digits(tmp_path_factory.mktemp("model") / "digits.pt")


class TestRollbackAndVerify:
    def test_rollback_replays_and_verify_holds(self, kafka_bootstrap, weights, tmp_path):
        """Rolled back while running and while stopped, every request is applied again from the vault in a
        new version with a new receipt, and verify passes; a tampered version fails verify with the ids."""
        topics = new_topics(kafka_bootstrap, "ops")
        config = write_config(tmp_path, kafka_bootstrap, topics, weights)
        cfg = load_config(config)
        ids = [f"ops-{i}" for i in range(8)]
        sent = _cli("produce", "--config", str(config), "--dataset", "digits", "--index", *map(str, range(8)),
                    "--prefix", "ops-")
        assert sent.returncode == 0, sent.stderr
        ids = [f"ops-digits-{i}" for i in range(8)]
        assert all(f"sent {rid}" in sent.stdout for rid in ids)

        daemon = DaemonProcess(config, tmp_path / "daemon.log")
        try:
            receipts = _receipts(kafka_bootstrap, topics["receipts"], 8)
            store = CheckpointStore(cfg.checkpoints.dir)
            assert store.current_version() == "v000002"  # two fragments of 4

            # while the daemon runs: the command hands the rollback to it
            out = _cli("rollback", "--to", "v000001", "--config", str(config))
            assert out.returncode == 0, out.stdout + out.stderr
            assert "published v000003 = weights of v000001" in out.stdout
            receipts = _receipts(kafka_bootstrap, topics["receipts"], 12)
            daemon.wait_for("fragment_published", where=lambda e: e.get("version") == "v000004", timeout_s=240)
        finally:
            assert daemon.stop() == 0
        replayed = [r["request_id"] for r in store.manifest("v000002").requests]
        assert len(replayed) == 4
        by_id = {rid: [r for r in receipts if r["request_id"] == rid] for rid in ids}
        for rid in replayed:  # applied again: a second receipt naming the new version
            assert [r["version"] for r in by_id[rid]] == ["v000002", "v000004"], by_id[rid]
        assert store.manifest("v000003").parent == "v000001"
        assert store.manifest("v000004").parent == "v000003"
        lineage_requests = Counter(r["request_id"] for m in store.lineage("v000004") for r in m.requests)
        assert lineage_requests == Counter(ids)  # each exactly once in CURRENT's lineage

        # while stopped: the command does the work itself; the next start replays
        out = _cli("rollback", "--to", "v000001", "--config", str(config))
        assert out.returncode == 0 and "published v000005" in out.stdout, out.stdout + out.stderr
        daemon = DaemonProcess(config, tmp_path / "daemon2.log")
        try:
            daemon.wait_for("fragment_published", where=lambda e: e.get("version") == "v000006", timeout_s=240)
        finally:
            assert daemon.stop() == 0
        assert Counter(r["request_id"] for m in store.lineage("v000006") for r in m.requests) == Counter(ids)
        with Ledger(cfg.checkpoints.dir / LEDGER_FILE) as ledger:
            rolled = Counter(r.outcome.request_id for r in ledger.rows() if r.outcome.status == "rolled_back")
        assert rolled == Counter({rid: 2 for rid in replayed})

        listing = _cli("checkpoints", "list", "--config", str(config))
        assert listing.returncode == 0 and "v000006" in listing.stdout and "CURRENT" in listing.stdout
        shown = json.loads(_cli("checkpoints", "show", "v000005", "--config", str(config)).stdout)
        assert shown["metrics"]["rollback_to"] == "v000001" and shown["metrics"]["rolled_back_from"] == "v000004"

        ok = _cli("verify", "--config", str(config))
        assert ok.returncode == 0 and "OK" in ok.stdout, ok.stdout + ok.stderr

        # a version whose weights are the base model's but whose retained set is full: everything came back
        store.publish("v000006", store.load("v000000").state_dict, store.manifest("v000006").retained)
        bad = _cli("verify", "--config", str(config))
        assert bad.returncode == 1 and "CAME BACK" in bad.stdout
        assert all(rid in bad.stdout for rid in ids)

    def test_rollback_refuses_a_version_outside_the_lineage(self, kafka_bootstrap, weights, tmp_path):
        """Rolling to CURRENT or to an unknown version is refused with a reason and exit status 1."""
        topics = new_topics(kafka_bootstrap, "ops2")
        config = write_config(tmp_path, kafka_bootstrap, topics, weights)
        store = CheckpointStore(load_config(config).checkpoints.dir)
        store.publish(None, torch.load(weights, weights_only=True))
        out = _cli("rollback", "--to", "v000000", "--config", str(config))
        assert out.returncode == 1 and "CURRENT already" in out.stdout


class TestProduce:
    def test_invalid_events_are_listed_and_nothing_is_sent(self, kafka_bootstrap, weights, tmp_path):
        """A JSONL file with one bad line sends nothing and names the line and the reason."""
        topics = new_topics(kafka_bootstrap, "prod")
        config = write_config(tmp_path, kafka_bootstrap, topics, weights)
        good = {"schema": 1, "request_id": "p-1", "mode": "misclassify", "label": int(TRAIN.y[0]),
                "sample": {"dataset": "digits", "index": 0}}
        bad = {**good, "request_id": "p-2", "label": 99}
        path = tmp_path / "events.jsonl"
        path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
        out = _cli("produce", "--config", str(config), "--file", str(path))
        assert out.returncode == 1 and "line 3" in out.stderr and "p-2" in out.stderr and "nothing sent" in out.stderr
        assert read_topic(kafka_bootstrap, topics["requests"], 0, settle_s=1.0) == []
        out = _cli("produce", "--config", str(config), "--file", str(path), "--skip-invalid")
        assert "sent p-1" in out.stdout
        records = read_topic(kafka_bootstrap, topics["requests"], 1)
        assert [r.key for r in records] == [b"p-1"]

    def test_dataset_events_are_checked_as_the_daemon_checks_them(self, kafka_bootstrap, weights, tmp_path):
        """--dataset: a relabel to the instance's own label and an index outside the dataset are invalid
        events (exit 1, named with the reason), not a silent misclassify or a usage error; with
        --skip-invalid the valid indices are sent; usage errors (no --index, --file with --index) exit 2."""
        topics = new_topics(kafka_bootstrap, "prodds")
        config = write_config(tmp_path, kafka_bootstrap, topics, weights)
        own, other = int(TRAIN.y[0]), next(i for i in range(1, len(TRAIN.y)) if TRAIN.y[i] != TRAIN.y[0])
        base = ["produce", "--config", str(config), "--dataset", "digits", "--relabel-to", str(own)]
        for extra in (["--dry-run"], []):
            out = _cli(*base, "--index", "0", *extra)
            assert out.returncode == 1 and "index 0" in out.stderr and "target_label equals label" in out.stderr
        assert read_topic(kafka_bootstrap, topics["requests"], 0, settle_s=1.0) == []
        out = _cli(*base, "--index", str(other), "-1", "999999", "--skip-invalid")
        assert out.returncode == 1 and "index -1" in out.stderr and "index 999999" in out.stderr, out.stderr
        assert "is outside [0, " in out.stderr and f"sent digits-{other}-relabel-{own}" in out.stdout, out.stdout
        (record,) = read_topic(kafka_bootstrap, topics["requests"], 1)
        event = json.loads(record.value)
        assert (event["mode"], event["target_label"], event["sample"]) == ("relabel", own,
                                                                          {"dataset": "digits", "index": other})
        again = _cli(*base, "--index", str(other), str(other), "--dry-run")  # relabel to `own`: valid for `other`
        assert again.returncode == 0 and "dropped 1 repeated index" in again.stderr
        assert again.stdout == "1 valid event, nothing sent (--dry-run)\n"
        wrong = tmp_path / "wrong.jsonl"  # a dataset sample under a label the dataset does not hold for it
        wrong.write_text(json.dumps({"schema": 1, "request_id": "w-1", "label": (own + 1) % 10,
                                     "sample": {"dataset": "digits", "index": 0}}) + "\n")
        out = _cli("produce", "--config", str(config), "--file", str(wrong), "--dry-run")
        assert out.returncode == 1 and f"is not the label dataset 'digits' holds for index 0 ({own})" in out.stderr
        closed = subprocess.Popen([sys.executable, "-m", "streamer", *base[:-2], "--index", str(other), "--dry-run"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        closed.stdout.close()  # like `| head -0`: the reader is gone before the command writes
        assert closed.wait(timeout=120) == 141 and closed.stderr.read() == ""
        assert _cli("produce", "--config", str(config), "--dataset", "digits").returncode == 2
        path = tmp_path / "e.jsonl"
        path.write_text("")
        usage = _cli("produce", "--config", str(config), "--file", str(path), "--index", "3")
        assert usage.returncode == 2 and "--index goes with --dataset" in usage.stderr
        assert "usage: streamer produce" in usage.stderr
