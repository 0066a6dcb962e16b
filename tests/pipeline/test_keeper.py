"""Tests for streamer.service.privacy (VaultKeeper) and streamer.state.shreds: windows close, instances are
checked once more, crypto-shredded, recorded and dropped from the objective; replay rebuilds requests from
the vault. Real vault, real ledger database, a real (tiny) model; no broker."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import structlog
import torch
from prometheus_client import CollectorRegistry

from streamer.config import PrivacyConfig
from engine_fixtures import constant_classifier
from streamer.engine.models import Normalized
from streamer.engine.unlearn import method_config
from streamer.intake.events import ForgetRequest
from streamer.pipeline.collector import Accepted
from streamer.pipeline.worker import FragmentWorker
from streamer.telemetry.metrics import Metrics
from streamer.pipeline.commit import Commit
from streamer.pipeline.keeper import VaultKeeper, replay_batch
from streamer.state.checkpoints import CheckpointStore, ForgottenSet, Manifest
from streamer.state.kek import LocalKEK
from streamer.state.ledger import LEDGER_FILE
from streamer.state.retained import Window, next_refs
from streamer.state.shreds import ShredLog, ShredRow
from streamer.state.vault import ForgetVault, VaultItem

SHAPE = (1, 2, 2)
ENGINE = dict(n_adv=0, distill_weight=0.0, lr=1e-4, seed=0, max_steps=1)
T0 = 1_700_000_000.0

def _accepted(requests: list[ForgetRequest]) -> list[Accepted]:
    """Requests as the collector hands them over (read from one partition, in order)."""
    return [Accepted(r, "t", 0, i, 0.0) for i, r in enumerate(requests)]



class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def _model(bias: float) -> Normalized:
    return constant_classifier(bias, SHAPE)


def _request(rid: str, label: int, value: float) -> ForgetRequest:
    return ForgetRequest(request_id=rid, mode="misclassify", label=label, target_label=None,
                         x=torch.full(SHAPE, value), subject=f"subject-{rid}")


class Rig:
    """A checkpoint directory, vault, shred log and worker, run through fragments the way the pipeline does."""

    def __init__(self, root: Path, privacy: PrivacyConfig, bias: float = 50.0):
        self.clock = Clock()
        self.store = CheckpointStore(root / "ckpt", clock=self.clock)
        self.vault = ForgetVault.open(root / "ckpt" / "vault", LocalKEK(bytes(32)), clock=self.clock)
        self.shreds = ShredLog(root / "ckpt" / LEDGER_FILE)
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.worker = FragmentWorker(_model(bias), method_config("default", **ENGINE), 3, ForgottenSet.empty(SHAPE))
        # the shred path of the commit only: no outbox or consumer (this rig publishes by hand)
        self.commit = Commit(self.worker, self.store, self.vault, self.shreds, None, None,  # type: ignore[arg-type]
                             self.metrics, Window.of(privacy), structlog.get_logger("test"), self.clock)
        self.keeper = VaultKeeper(self.vault, self.shreds, self.commit, privacy, self.metrics, self.clock)
        self.manifest: Manifest = self.store.publish(None, self.worker.model.state_dict())

    def fragment(self, requests: list[ForgetRequest]) -> Manifest:
        result = self.worker.run(_accepted(requests))
        assert result is not None
        entries = {e.request_id: e for e in self.vault.put(
            [VaultItem(r.request_id, r.x, r.label, r.goal.engine_target) for r in requests])}
        refs = next_refs(result.forgotten, result.retained_met, self.manifest.retained, entries,
                         self.store.next_version())
        entry = [{"request_id": r.request_id, "status": "forgotten", "topic": "req", "partition": 0, "offset": i,
                  "mode": r.mode, "label": r.label, "target_label": r.target_label, "subject": r.subject}
                 for i, r in enumerate(requests)]
        self.manifest = self.store.publish(self.manifest.version, self.worker.model.state_dict(), refs,
                                           requests=entry)
        return self.manifest

    def sample(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)


class TestShredding:
    def test_a_window_closed_by_fragments_shreds_records_and_drops(self, tmp_path: Path) -> None:
        """After `fragments` later versions the instance is checked on CURRENT's weights, its key destroyed,
        the shred recorded with that version, and it leaves the retained set and the objective."""
        rig = Rig(tmp_path, PrivacyConfig(verify_window_days=14, verify_window_fragments=1))
        rig.fragment([_request("a", 1, 0.1)])  # the model predicts 0: "a" (label 1) is forgotten already
        assert rig.keeper.tick(rig.manifest, force=True) == []  # its window is open
        current = rig.fragment([_request("b", 2, 0.2)])
        (row,) = rig.keeper.tick(current, force=True)
        assert (row.request_id, row.verified_version, row.at_version) == ("a", "v000002", "v000002")
        assert row.verified_at_shred and "verified in 1 later version" in row.reason and "versions" not in row.reason
        assert "a" not in rig.vault and rig.shreds.rows()["a"] == row
        assert rig.worker.forgotten.request_ids == ("b",)
        assert rig.sample("streamer_vault_shreds_total", verified="true") == 1.0
        assert rig.sample("streamer_vault_entries") == 1.0 and rig.sample("streamer_forgotten_instances") == 1.0

    def test_a_window_closed_by_days_shreds_even_without_traffic(self, tmp_path: Path) -> None:
        """An idle daemon shreds on its periodic check once the days have passed, not before."""
        rig = Rig(tmp_path, PrivacyConfig(verify_window_days=1.0, check_every_s=60.0))
        rig.fragment([_request("a", 1, 0.1)])
        rig.clock.now += 86_400 - 1
        assert rig.keeper.tick(rig.manifest, force=True) == []
        assert rig.sample("streamer_vault_oldest_entry_age_seconds") == 86_399.0
        rig.clock.now += 30
        assert rig.keeper.tick(rig.manifest) == []  # the next check is not due yet
        rig.clock.now += 60
        (row,) = rig.keeper.tick(rig.manifest)
        assert row.request_id == "a" and "1 days since it was first applied" in row.reason
        assert rig.sample("streamer_vault_oldest_entry_age_seconds") == 0.0

    def test_a_failed_final_check_still_shreds_and_says_so(self, tmp_path: Path) -> None:
        """An instance that misses its goal at the final check is shredded at the deadline, verified_version
        naming the last version where it held (none here), and counted verified=false."""
        rig = Rig(tmp_path, PrivacyConfig(verify_window_days=0.0))
        rig.fragment([_request("a", 0, 0.1)])  # label 0, predicted 0 after one step: goal missed
        (row,) = rig.keeper.tick(rig.manifest, force=True)
        assert row.verified_version is None and not row.verified_at_shred
        assert "did NOT hold on v000001" in row.reason and "erasure deadline" in row.reason
        assert rig.sample("streamer_vault_shreds_total", verified="false") == 1.0

    def test_an_abandoned_instance_is_shredded_with_its_reason(self, tmp_path: Path) -> None:
        """A vaulted instance CURRENT no longer references (abandoned) is shredded at once, recorded with the
        last version that verified it, not left for a silent clean-up."""
        rig = Rig(tmp_path, PrivacyConfig())
        applied = rig.fragment([_request("a", 1, 0.1)])
        abandoned = [{"request_id": "a", "status": "abandoned", "reason": "goal out of reach", "topic": "req",
                      "partition": 0, "offset": 0, "subject": None}]
        rig.worker.drop({"a"})
        current = rig.store.publish(applied.version, rig.worker.model.state_dict(), abandoned=abandoned)
        (row,) = rig.keeper.tick(current, force=True)
        assert (row.request_id, row.verified_version, row.at_version) == ("a", "v000001", "v000002")
        assert row.reason.startswith("abandoned:") and "a" not in rig.vault and not row.verified_at_shred

    def test_the_shred_counter_continues_from_the_ledger(self, tmp_path: Path) -> None:
        """A new keeper (a restart) counts the shreds already in the ledger."""
        rig = Rig(tmp_path, PrivacyConfig(verify_window_days=0.0))
        rig.fragment([_request("a", 1, 0.1), _request("b", 2, 0.2)])
        rig.keeper.tick(rig.manifest, force=True)
        registry = CollectorRegistry()
        VaultKeeper(rig.vault, ShredLog(tmp_path / "ckpt" / LEDGER_FILE), rig.commit, PrivacyConfig(),
                    Metrics(registry))
        assert registry.get_sample_value("streamer_vault_shreds_total", {"verified": "true"}) == 2.0
        assert registry.get_sample_value("streamer_vault_verify_window_seconds") == 14 * 86_400


class TestReplay:
    def test_replay_batch_rebuilds_requests_from_the_vault(self, tmp_path: Path) -> None:
        """The replay list's first k requests come back with their pixels bitwise, labels, subject and record."""
        rig = Rig(tmp_path, PrivacyConfig())
        requests = [_request("a", 1, 0.25), _request("b", 2, 0.75)]
        applied = rig.fragment(requests)
        rolled = rig.store.publish("v000000", rig.worker.model.state_dict(), replay=applied.requests)
        batch = replay_batch(rig.vault, rolled, 1)
        assert len(batch) == 1 and isinstance(batch[0], Accepted)
        (first,) = batch
        assert (first.request.request_id, first.request.label, first.request.subject) == ("a", 1, "subject-a")
        assert torch.equal(first.request.x, requests[0].x) and (first.topic, first.offset) == ("req", 0)


class TestShredLog:
    def test_append_only_and_first_row_wins(self, tmp_path: Path) -> None:
        """A repeated row is ignored, and the table refuses UPDATE and DELETE."""
        log = ShredLog(tmp_path / LEDGER_FILE)
        row = ShredRow("a", "v000002", "v000002", "2024-01-01T00:00:00.000Z", "local:1", "closed")
        log.append([row])
        log.append([ShredRow("a", "v000009", "v000009", "2025-01-01T00:00:00.000Z", "local:1", "again")])
        assert log.rows() == {"a": row}
        db = sqlite3.connect(tmp_path / LEDGER_FILE)
        for statement in ("UPDATE shreds SET reason = 'x'", "DELETE FROM shreds"):
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                db.execute(statement)

    def test_a_shred_the_ledger_missed_is_recorded_from_the_vault(self, tmp_path: Path) -> None:
        """A vault entry shredded without its row (a crash in between) gets a row on start, and only once."""
        vault = ForgetVault.open(tmp_path / "vault", LocalKEK(bytes(32)), clock=lambda: T0)
        vault.put([VaultItem("a", torch.zeros(SHAPE), 1, -1), VaultItem("b", torch.zeros(SHAPE), 1, -1)])
        vault.shred("a", "v000004")
        log = ShredLog(tmp_path / LEDGER_FILE)
        (row,) = log.record_missing(vault.entries(), vault.kek.key_id)
        assert (row.request_id, row.verified_version, row.at_version) == ("a", "v000004", None)
        assert "recorded on start" in row.reason and log.record_missing(vault.entries(), vault.kek.key_id) == []
