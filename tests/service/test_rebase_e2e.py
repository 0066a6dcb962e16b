"""The bridge between retrainings end to end: a stream that crosses the utility budget is deferred,
`streamer forgotten` lists every request, and `streamer rebase` onto a model retrained without
them -- run by the live daemon, SIGKILLed inside it -- leaves every request exactly once in the
lineage, nothing owed, and the audit baseline on the retrained model's."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from daemon_harness import USEFUL_UNLEARNING, DaemonProcess, new_topics, produce, read_topic, train_digits, values, write_config
from streamer.engine.data import Dataset, load_splits
from streamer.engine.evaluate import accuracy
from streamer.engine.train import fit, reference_model
from streamer.intake.events import encode_event
from streamer.state.checkpoints import CheckpointStore
from streamer.state.ledger import LEDGER_FILE, Ledger

pytestmark = pytest.mark.kafka

SPLITS = load_splits("digits")
INDICES = list(range(100, 112))


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_digits(tmp_path_factory.mktemp("model") / "digits.pt")


def _retrained(out: Path, excluded: list[int]) -> Path:
    """The digits reference CNN trained as train_digits does, without `excluded` train indices."""
    keep = torch.ones(len(SPLITS.train), dtype=torch.bool)
    keep[excluded] = False
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = reference_model("digits")
        fit(model, Dataset(SPLITS.train.x[keep], SPLITS.train.y[keep]), 12, seed=0)
    finally:
        torch.set_num_threads(threads)
    torch.save(model.state_dict(), out)
    return out


def _set_budget(config: Path, max_audit_drop: float) -> None:
    settings = yaml.safe_load(config.read_text())
    settings["unlearning"]["max_audit_drop"] = max_audit_drop
    config.write_text(yaml.safe_dump(settings))


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamer", *args], capture_output=True, text=True, timeout=timeout)


def test_deferred_then_rebased_through_a_kill_9(kafka_bootstrap: str, weights: Path, tmp_path: Path) -> None:
    topics = new_topics(kafka_bootstrap, "rebase")
    config = write_config(tmp_path, kafka_bootstrap, topics, weights, fast=False, unlearning=USEFUL_UNLEARNING,
                          data={"buffer": {"builtin": "digits", "split": "buffer"}})
    ids = [f"r{i}" for i in INDICES]
    events = [(rid.encode(), encode_event(rid, "misclassify", int(SPLITS.train.y[i]), SPLITS.train.x[i]))
              for rid, i in zip(ids, INDICES)]
    # Within the budget first; then a budget of 0 (no drop below the base model's audit accuracy),
    # which the model has already spent: every later fragment is deferred, whatever it costs.
    for phase, (sent, budget) in enumerate([(events[:4], None), (events[4:], 0.0)]):
        if budget is not None:
            _set_budget(config, budget)
        produce(kafka_bootstrap, topics["requests"], sent)  # all there before the daemon reads: fragments of 4
        daemon = DaemonProcess(config, tmp_path / f"daemon{phase}.log")
        try:
            daemon.wait_for("request_outcome", count=len(sent), timeout_s=300)
        finally:
            daemon.stop()
    first = {r["request_id"]: r["status"] for r in values(read_topic(kafka_bootstrap, topics["receipts"], 12))}
    assert all(first[rid] == "forgotten" for rid in ids[:4]), first
    assert set(first) == set(ids) and {first[rid] for rid in ids[4:]} == {"deferred"}, first  # past the budget

    listed = _cli("forgotten", "--config", str(config), "--out", str(tmp_path / "excluded.json"))
    assert listed.returncode == 0, listed.stderr
    document = json.loads((tmp_path / "excluded.json").read_text())
    assert {r["request_id"]: r["status"] for r in document["requests"]} == {
        rid: "deferred" if status == "deferred" else "retained" for rid, status in first.items()}
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"requests": document["requests"][1:]}))
    refused = _cli("rebase", "--weights", str(weights), "--excluded", str(partial), "--config", str(config))
    assert refused.returncode == 1 and "does not name 1 requests" in refused.stdout

    new = _retrained(tmp_path / "retrained.pt", INDICES)
    _set_budget(config, USEFUL_UNLEARNING["max_audit_drop"])  # a fresh budget on the retrained model
    crashed = DaemonProcess(config, tmp_path / "crash.log", crash_at="rebase_after_publish")
    try:
        crashed.wait_for("partitions_assigned", timeout_s=90)
        timed_out = _cli("rebase", "--weights", str(new), "--excluded", str(tmp_path / "excluded.json"),
                         "--config", str(config), "--timeout", "15")
        assert crashed.wait(timeout_s=60) == -9 and timed_out.returncode == 2  # killed after publishing, unanswered
    finally:
        crashed.kill()
    store = CheckpointStore(tmp_path / "checkpoints")
    rebased = store.manifest(store.current_version())
    assert rebased.base["sha256"] == hashlib.sha256(new.read_bytes()).hexdigest() and rebased.deferred == ()

    daemon = DaemonProcess(config, tmp_path / "daemon_rebased.log")
    try:
        replayed = len(rebased.replay)
        daemon.wait_for("request_outcome", count=replayed, timeout_s=300)
        _, metrics = daemon.get("/metrics")
    finally:
        daemon.stop()
    lineage = store.lineage(store.current_version())
    assert lineage[-1].version == rebased.version  # the retrained model starts a lineage of its own
    in_lineage = Counter(r["request_id"] for m in lineage for r in m.requests)
    owed = {d["request_id"] for d in store.manifest(store.current_version()).deferred}
    assert set(in_lineage.values()) == {1} and set(in_lineage) | owed == set(ids) and not set(in_lineage) & owed
    with Ledger(tmp_path / "checkpoints" / LEDGER_FILE) as ledger:
        assert {rid for rid in ids if ledger.owed(rid)} == owed
        rebased_rows = [r.outcome.request_id for r in ledger.rows() if r.outcome.status == "rebased"]
        assert sorted(rebased_rows) == sorted(r["request_id"] for r in rebased.requests)  # once, though killed
    receipts = values(read_topic(kafka_bootstrap, topics["receipts"], 12 + replayed))
    final = {r["request_id"]: r["status"] for r in receipts}  # the last receipt of each request
    assert all(final[rid] == "forgotten" for rid in ids if first[rid] == "deferred")  # the rebase cleared them
    assert all(final[rid] == "deferred" for rid in owed)  # a budget reached again says so
    gauge = next(x for x in metrics.splitlines() if x.startswith("streamer_deferred_requests "))
    assert float(gauge.split()[1]) == len(owed)
    retrained = reference_model("digits")
    retrained.load_state_dict(torch.load(new, weights_only=True))
    expected = accuracy(retrained.eval(), SPLITS.audit.x, SPLITS.audit.y)
    line = next(x for x in metrics.splitlines() if x.startswith("streamer_audit_accuracy_baseline_ratio "))
    assert float(line.split()[1]) == pytest.approx(expected, abs=1e-6)
