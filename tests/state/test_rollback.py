"""Rollback planning and application on a real checkpoint directory and ledger (no broker)."""
import json

import pytest
import torch

from streamer.state.checkpoints import CheckpointStore, RetainedRef
from streamer.state.ledger import Ledger
from streamer.state.lock import DirectoryLock
from streamer.state.rollback import RollbackRefused, apply_rollback, plan_rollback


def _entry(rid, offset):
    return {"request_id": rid, "status": "forgotten", "reason": None, "topic": "req", "partition": 0,
            "offset": offset, "subject": None, "mode": "misclassify", "label": 1, "target_label": None}


def _publish(store, parent, n, first_offset, weight):
    requests = [_entry(f"r{first_offset + i}", first_offset + i) for i in range(n)]
    state = {"w": torch.full((2,), float(weight))}
    version = store.next_version()
    retained = [RetainedRef(f"r{i}", "0" * 64, version, "2024-01-01T00:00:00.000Z", True)
                for i in range(first_offset + n)]
    return store.publish(parent, state, retained, requests=requests, offsets={"req": {0: first_offset + n}})


def _all(rid):
    return True


@pytest.fixture
def history(tmp_path):
    """v0 (base) <- v1 (r0, r1) <- v2 (r2, r3) <- v3 (r4)."""
    store = CheckpointStore(tmp_path)
    store.publish(None, {"w": torch.zeros(2)})
    _publish(store, "v000000", 2, 0, 1)
    _publish(store, "v000001", 2, 2, 2)
    _publish(store, "v000002", 1, 4, 3)
    return store


class TestPlan:
    def test_replays_everything_after_the_target(self, history):
        """Rolling back to v1 replays the requests of v2 and v3, oldest first, with what is needed to rebuild them."""
        plan = plan_rollback(history, "v000001", _all)
        assert [e["request_id"] for e in plan.replay] == ["r2", "r3", "r4"] and plan.lost == ()
        assert plan.replay[0]["mode"] == "misclassify" and plan.replay[0]["offset"] == 2
        assert plan.to.version == "v000001" and plan.current.version == "v000003"

    def test_shredded_requests_are_lost(self, history):
        """Requests whose instance is no longer in the vault cannot be replayed and are listed as lost."""
        plan = plan_rollback(history, "v000001", lambda rid: rid != "r2")
        assert [e["request_id"] for e in plan.lost] == ["r2"]
        assert [e["request_id"] for e in plan.replay] == ["r3", "r4"]

    @pytest.mark.parametrize("target", ["v000003", "v000009"])
    def test_refuses_current_or_unknown(self, history, target):
        """CURRENT itself and versions outside CURRENT's lineage are refused."""
        with pytest.raises(RollbackRefused):
            plan_rollback(history, target, _all)

    def test_a_pending_replay_is_carried_into_the_next_rollback(self, history, tmp_path):
        """Rolling back again before the daemon replayed keeps the earlier rollback's requests to replay."""
        with Ledger(tmp_path / "ledger.sqlite3") as ledger:
            apply_rollback(history, ledger, plan_rollback(history, "v000002", _all), False, _all)
            plan = plan_rollback(history, "v000001", _all)
        assert sorted(e["request_id"] for e in plan.replay) == ["r2", "r3", "r4"]


class TestApply:
    def test_new_version_has_target_state_and_current_offsets(self, history, tmp_path):
        """The new version carries v1's weights and retained set, CURRENT's offsets and the replay list;
        the undone requests are rolled_back in the ledger."""
        with Ledger(tmp_path / "ledger.sqlite3") as ledger:
            plan = plan_rollback(history, "v000001", _all)
            manifest = apply_rollback(history, ledger, plan, False, _all)
            assert manifest.version == "v000004" and manifest.parent == "v000001"
            assert history.current_version() == "v000004"
            assert manifest.offsets == {"req": {0: 5}} and manifest.metrics["rolled_back_from"] == "v000003"
            assert [e["request_id"] for e in manifest.replay] == ["r2", "r3", "r4"]
            loaded = history.load("v000004")
            assert torch.equal(loaded.state_dict["w"], torch.ones(2))
            assert [r.request_id for r in loaded.manifest.retained] == ["r0", "r1"]
            rolled = [r.outcome for r in ledger.rows() if r.outcome.status == "rolled_back"]
            assert sorted(o.request_id for o in rolled) == ["r2", "r3", "r4"]
            assert all("applied again from the forget vault" in o.reason for o in rolled)
            assert [m.version for m in history.lineage("v000004")] == ["v000004", "v000001", "v000000"]

    def test_wrapper_like_keys_of_a_current_version_are_kept(self, tmp_path):
        """A version that recorded its format keeps its file as is, even when the user's own keys look
        like the old wrapper's (net.*, mean, std)."""
        store = CheckpointStore(tmp_path / "ckpt")
        store.publish(None, {"net.w": torch.ones(2), "mean": torch.zeros(1), "std": torch.ones(1)})
        _publish(store, "v000000", 1, 0, 5)
        with Ledger(tmp_path / "ledger.sqlite3") as ledger:
            manifest = apply_rollback(store, ledger, plan_rollback(store, "v000000", _all), False, _all)
        assert manifest.model_sha256 == store.manifest("v000000").model_sha256

    def test_model_file_is_republished_byte_for_byte(self, history, tmp_path):
        """The new version's model file is the target's, same format and sha256."""
        with Ledger(tmp_path / "ledger.sqlite3") as ledger:
            manifest = apply_rollback(history, ledger, plan_rollback(history, "v000002", _all), False, _all)
        target = history.manifest("v000002")
        assert (manifest.model_sha256, manifest.model_format) == (target.model_sha256, target.model_format)
        assert history.load(manifest.version).model.data == history.load("v000002").model.data

    def test_wrapper_keyed_target_comes_back_with_the_users_keys(self, tmp_path):
        """Rolling back to a version written before formats (net.*, mean, std) publishes the net's own keys."""
        store = CheckpointStore(tmp_path / "ckpt")
        wrapper = {"net.w": torch.ones(2), "mean": torch.zeros(1, 1, 1, 1), "std": torch.ones(1, 1, 1, 1)}
        store.publish(None, wrapper)
        path = store.path("v000000") / "manifest.json"
        data = json.loads(path.read_text())
        del data["model_format"], data["model_file"]  # as written before formats
        path.write_text(json.dumps(data))
        _publish(store, "v000000", 1, 0, 5)
        with Ledger(tmp_path / "ledger.sqlite3") as ledger:
            manifest = apply_rollback(store, ledger, plan_rollback(store, "v000000", _all), False, _all)
        assert set(store.load(manifest.version).state_dict) == {"w"}

    def test_refuses_shredded_without_force_and_records_them_with_force(self, history, tmp_path):
        """Shredded requests refuse the rollback (naming them) unless forced; then they are recorded, not replayed,
        and a shredded instance of the target's retained set leaves it."""
        def in_vault(rid):
            return rid not in ("r2", "r0")

        with Ledger(tmp_path / "ledger.sqlite3") as ledger:
            plan = plan_rollback(history, "v000001", in_vault)
            with pytest.raises(RollbackRefused, match="crypto-shredded.*: r2\\. Roll back"):
                apply_rollback(history, ledger, plan, False, in_vault)
            assert history.current_version() == "v000003"  # nothing published
            manifest = apply_rollback(history, ledger, plan, True, in_vault)
            reasons = {r.outcome.request_id: r.outcome.reason for r in ledger.rows()}
            assert "NOT applied again" in reasons["r2"] and "applied again from the forget vault" in reasons["r3"]
            assert [e["request_id"] for e in manifest.replay] == ["r3", "r4"]
            assert [r.request_id for r in manifest.retained] == ["r1"]


class TestDirectoryLock:
    def test_second_holder_is_refused(self, tmp_path):
        """Only one process (or lock object) holds the directory lock at a time."""
        first, second = DirectoryLock(tmp_path), DirectoryLock(tmp_path)
        assert first.acquire()
        assert not second.acquire()
        first.release()
        assert second.acquire()
        second.release()
