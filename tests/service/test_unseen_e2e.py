"""The unseen goal end to end: `streamer run` as a subprocess against the real test broker, killed
after publishing a version and restarted; `streamer produce --mode unseen` and `streamer verify`."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from daemon_harness import DaemonProcess, new_topics, run_until_crash, produce, read_topic, train_digits, values, write_config
from streamer.cli.erasure import erasure_report
from streamer.config import load_config
from streamer.engine.data import load_splits
from streamer.intake.events import encode_event
from streamer.state.checkpoints import CheckpointStore
from streamer.state.ledger import LEDGER_FILE, Ledger
from streamer.state.retained import load_retained, open_vault

pytestmark = pytest.mark.kafka

TRAIN = load_splits("digits").train


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_digits(tmp_path_factory.mktemp("model") / "digits.pt")


def _event(rid: str, index: int, mode: str | None, target: int | None = None) -> tuple[bytes, bytes]:
    return rid.encode(), encode_event(rid, mode, int(TRAIN.y[index]), TRAIN.x[index], target_label=target)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamer", *args], capture_output=True, text=True, timeout=300)


def test_unseen_requests_through_a_crash_and_a_restart(kafka_bootstrap: str, weights: Path, tmp_path: Path) -> None:
    """Unseen requests (explicit, and by unlearning.default_mode) get receipts with their mode and the
    class they now go to; a conflicting misclassify / relabel of the same instance is rejected, before
    and after they are applied; killed between the version and the ledger, the restarted daemon sends
    the same classes (from the manifest), reloads them from the vault, applies another unseen request
    of the same instance, and `streamer verify` passes."""
    topics = new_topics(kafka_bootstrap, "unseen")
    config = write_config(tmp_path, kafka_bootstrap, topics, weights, unlearning={"default_mode": "unseen"})
    cfg = load_config(config)
    produce(kafka_bootstrap, topics["requests"], [
        _event("u0", 40, "unseen"), _event("c-m", 40, "misclassify"), _event("u1", 41, None),
        _event("c-bad", 44, "unseen", target=(int(TRAIN.y[44]) + 1) % 10), _event("u2", 42, "unseen"),
        _event("m3", 43, "misclassify")])
    run_until_crash(config, tmp_path / "crash.log", "after_checkpoint", timeout_s=240)

    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    try:
        read_topic(kafka_bootstrap, topics["receipts"], 6, timeout_s=120)
        produce(kafka_bootstrap, topics["requests"], [_event("c-r", 41, "relabel", (int(TRAIN.y[41]) + 1) % 10)])
        sent = _cli("produce", "--config", str(config), "--dataset", "digits", "--index", "40", "--mode", "unseen")
        assert sent.returncode == 0 and "sent digits-40" in sent.stdout, sent.stdout + sent.stderr
        daemon.wait_for("fragment_published", where=lambda e: e.get("version") == "v000002", timeout_s=240)
        receipts = values(read_topic(kafka_bootstrap, topics["receipts"], 8, timeout_s=120))
    finally:
        assert daemon.stop() == 0
    by_id = {r["request_id"]: r for r in receipts}
    assert len(receipts) == len(by_id) == 8, receipts
    unseen = ("u0", "u1", "u2", "digits-40")
    for rid in unseen:
        assert (by_id[rid]["status"], by_id[rid]["mode"]) == ("forgotten", "unseen"), by_id[rid]
        assert by_id[rid]["target_class"] in range(10)
    assert (by_id["m3"]["status"], by_id["m3"]["mode"], by_id["m3"]["target_class"]) == ("forgotten", "misclassify", None)
    assert by_id["c-bad"]["status"] == "rejected" and by_id["c-bad"]["reason"] == \
        "mode unseen takes no target_label (use mode relabel)"
    for rid, other in (("c-m", "u0"), ("c-r", "u1")):
        assert by_id[rid]["status"] == "rejected" and "conflicts with a goal already asked" in by_id[rid]["reason"]
        assert "unseen goal" in by_id[rid]["reason"] and other not in by_id[rid]["reason"]  # never the other's id

    store = CheckpointStore(cfg.checkpoints.dir)
    current = store.manifest(store.current_version())
    entries = {e["request_id"]: e for m in store.lineage(current.version) for e in m.requests}
    assert {rid: entries[rid]["target_class"] for rid in unseen} == {rid: by_id[rid]["target_class"] for rid in unseen}
    assert {r.request_id for r in current.retained if r.unseen} == set(unseen)
    retained, _ = load_retained(open_vault(cfg, writer=False), current, cfg.model.input_shape)
    stored = dict(zip(retained.request_ids, retained.target.tolist()))
    assert {rid: stored[rid] for rid in unseen} == {rid: by_id[rid]["target_class"] for rid in unseen}
    assert stored["m3"] == -1 and retained.unseen == set(unseen)
    with Ledger(cfg.checkpoints.dir / LEDGER_FILE) as ledger:
        rows = {row.outcome.request_id: row.outcome for row in ledger.rows()}
    assert (rows["u0"].mode, rows["u0"].target_class) == ("unseen", by_id["u0"]["target_class"])
    report = {r["request_id"]: r for r in erasure_report(cfg, offline=True)["requests"]}
    assert (report["u1"]["mode"], report["u1"]["target_class"]) == ("unseen", by_id["u1"]["target_class"])

    verified = _cli("verify", "--config", str(config))
    assert verified.returncode == 0 and "OK" in verified.stdout, verified.stdout + verified.stderr
