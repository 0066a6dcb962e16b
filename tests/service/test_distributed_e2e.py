"""`streamer run` under torchrun with 2 gloo processes against the real test broker: rank 0 alone
talks to Kafka and the checkpoint directory, rank 1 unlearns every fragment alongside it, and a
SIGTERM to torchrun stops the group cleanly (README "More than one process")."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from daemon_harness import DaemonProcess, new_topics, produce, read_topic, train_digits, values, write_config
from streamer.config import load_config
from streamer.engine.data import load_splits
from streamer.engine.models import Normalized, digits_cnn
from streamer.intake.events import encode_event

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

TRAIN = load_splits("digits").train


def test_two_ranks_serve_the_stream_and_stop_together(kafka_bootstrap: str, tmp_path: Path) -> None:
    """8 misclassify requests in 2 fragments of 4: every receipt `forgotten`, 2 versions published
    by rank 0 (the only writer: rank 1 opens no checkpoint directory), rank 1 ran both fragments,
    the published model misclassifies all 8, and SIGTERM to torchrun stops both ranks cleanly (rank
    0's daemon_stopped, then rank 1's follower_stopped after both fragments)."""
    weights = train_digits(tmp_path / "digits.pt")
    topics = new_topics(kafka_bootstrap, "ddp")
    config = write_config(tmp_path / "run", kafka_bootstrap, topics, weights)
    index = list(range(8))
    produce(kafka_bootstrap, topics["requests"],
            [(f"r{i}".encode(), encode_event(f"r{i}", "misclassify", int(TRAIN.y[i]), TRAIN.x[i])) for i in index])
    daemon = DaemonProcess(config, tmp_path / "daemon.log", ranks=2)
    try:
        receipts = values(read_topic(kafka_bootstrap, topics["receipts"], expected=8, timeout_s=300))
        daemon.wait_for("fragment_published", count=2, timeout_s=60)
    finally:
        daemon.stop(timeout_s=120)  # torchrun itself exits 1 on a signal (SignalException), whatever its workers did
    assert sorted(r["request_id"] for r in receipts) == [f"r{i}" for i in index]
    assert {r["status"] for r in receipts} == {"forgotten"}
    events = daemon.events()
    started = [e for e in events if e.get("event") == "follower_started"]
    stopped = [e for e in events if e.get("event") == "follower_stopped"]
    assert [(e["rank"], e["ranks"]) for e in started] == [(1, 2)]
    assert [e["fragments"] for e in stopped] == [2]
    names = [e.get("event") for e in events]
    assert names.index("daemon_stopped") < names.index("follower_stopped")
    assert [e["ranks"] for e in events if e.get("event") == "model_loaded"] == [2]  # rank 0 alone loads CURRENT
    cfg = load_config(config)
    current = cfg.checkpoints.dir / (cfg.checkpoints.dir / "CURRENT").read_text().strip()
    assert current.name == "v000002"
    net = digits_cnn()
    net.load_state_dict(torch.load(current / "model.pt", weights_only=True))
    model = Normalized(net, cfg.model.mean, cfg.model.std).eval()
    with torch.no_grad():
        assert (model(TRAIN.x[index]).argmax(1) != TRAIN.y[index]).all()
