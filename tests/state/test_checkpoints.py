"""Tests for streamer.state.checkpoints: append-only versions, atomic publication, verified loads."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from streamer.state import checkpoints
from streamer.state.checkpoints import (
    BASE_VERSION,
    CheckpointError,
    CheckpointStore,
    ForgottenSet,
    Manifest,
    ModelFile,
    RetainedRef,
)
from streamer.engine.formats import save_user_model
from streamer.engine.models import ModelConfig, Normalized, build_network

SHAPE = (1, 8, 8)
MODEL_CFG = ModelConfig(source="reference:digits", weights=None, input_shape=SHAPE)


def _model(seed: int = 0) -> Normalized:
    torch.manual_seed(seed)
    return Normalized(build_network(MODEL_CFG), (0.0,), (1.0,))


def _forgotten(n: int, seed: int = 0) -> ForgottenSet:
    g = torch.Generator().manual_seed(seed)
    return ForgottenSet(torch.rand((n, *SHAPE), generator=g), torch.randint(0, 10, (n,), generator=g),
                        torch.full((n,), -1), tuple(f"r{seed}-{i}" for i in range(n)))


def _refs(n: int, version: str = "v000001") -> tuple[RetainedRef, ...]:
    return tuple(RetainedRef(f"r{i}", f"{i:064x}", version, "2023-11-14T22:13:20.000Z", i % 2 == 0) for i in range(n))


def _publish_chain(store: CheckpointStore, n: int) -> list[Manifest]:
    """The base version and n children, each with one request."""
    manifests = [store.publish(None, _model().state_dict())]
    for i in range(1, n + 1):
        manifests.append(store.publish(
            manifests[-1].version, _model(i).state_dict(), _refs(i),
            requests=[{"request_id": f"r{i}", "status": "forgotten"}], offsets={"req": {0: i}},
            metrics={"steps": i}))
    return manifests


@pytest.fixture()
def store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(tmp_path / "ckpt", clock=lambda: 1_700_000_000.0)


class TestPublish:
    def test_round_trip(self, store: CheckpointStore) -> None:
        """A published version loads back with the same weights, retained references, replay list and manifest."""
        base = store.publish(None, _model().state_dict())
        model, refs = _model(1), _refs(3)
        replay = [{"request_id": "z", "status": "forgotten", "topic": "req", "partition": 0, "offset": 9}]
        manifest = store.publish(base.version, model.state_dict(), refs,
                                 requests=[{"request_id": "a", "status": "forgotten"}],
                                 offsets={"req": {0: 7, 2: 3}}, metrics={"steps": 5},
                                 duplicates=[{"request_id": "a", "status": "duplicate"}], replay=replay)
        loaded = store.load(manifest.version)
        assert loaded.manifest == manifest and store.manifest(manifest.version) == manifest
        assert loaded.manifest.offsets == {"req": {0: 7, 2: 3}}
        assert loaded.manifest.retained == refs and [dict(r) for r in loaded.manifest.replay] == replay
        assert all(torch.equal(loaded.state_dict[k], v) for k, v in model.state_dict().items())
        assert manifest.created_at == "2023-11-14T22:13:20.000Z" and manifest.schema == 2

    def test_versions_are_numbered_from_the_base(self, store: CheckpointStore) -> None:
        """The first version is v000000 with no parent; each next one names its parent and becomes CURRENT."""
        manifests = _publish_chain(store, 2)
        assert [(m.version, m.parent) for m in manifests] == [
            ("v000000", None), ("v000001", "v000000"), ("v000002", "v000001")]
        assert store.current_version() == "v000002"
        assert (store.root / "CURRENT").read_text() == "v000002\n"

    def test_only_the_first_version_has_no_parent(self, store: CheckpointStore) -> None:
        """A second root would fork the lineage: refused."""
        _publish_chain(store, 0)
        with pytest.raises(CheckpointError, match="only the first version"):
            store.publish(None, _model().state_dict())

    def test_model_pt_loads_into_the_configured_model(self, store: CheckpointStore) -> None:
        """model.pt is a plain state_dict: torch.load(weights_only=True) fits the configured model."""
        manifest = _publish_chain(store, 1)[-1]
        state = torch.load(store.path(manifest.version) / "model.pt", weights_only=True)
        fresh = _model(99)
        fresh.load_state_dict(state)
        assert torch.equal(fresh.net[0].weight, _model(1).net[0].weight)

    def test_manifest_file_has_the_documented_fields(self, store: CheckpointStore) -> None:
        """manifest.json carries version, parent, created_at, requests, offsets, metrics, the model's sha256
        and vault references; the version directory holds no forgotten.pt."""
        manifest = _publish_chain(store, 1)[-1]
        data = json.loads((store.path(manifest.version) / "manifest.json").read_text())
        assert {"version", "parent", "created_at", "requests", "duplicates", "offsets", "metrics",
                "model_sha256", "retained", "replay", "model_format", "model_file"} <= data.keys()
        assert "forgotten_sha256" not in data
        assert data["offsets"] == {"req": {"0": 1}}
        assert data["retained"] == [{"request_id": "r0", "digest": "0" * 64, "applied_in": "v000001",
                                     "applied_at": "2023-11-14T22:13:20.000Z", "met": True}]
        assert sorted(p.name for p in store.path(manifest.version).iterdir()) == ["manifest.json", "model.pt"]
        assert (data["model_format"], data["model_file"]) == ("state_dict", "model.pt")

    @pytest.mark.parametrize(("fmt", "name"), [("torchscript", "model.pt"), ("export", "model.pt2")])
    def test_model_files_of_each_format(self, store: CheckpointStore, fmt: str, name: str) -> None:
        """A ModelFile is written under its format's name, recorded in the manifest, sha256-checked and
        read back: its bytes as written, its weights keyed as the user's network."""
        net = _model(3).net.eval()
        data = save_user_model(net, fmt, SHAPE)
        manifest = store.publish(None, ModelFile(fmt, data))
        assert (manifest.model_format, manifest.model_file) == (fmt, name)
        assert (store.path(BASE_VERSION) / name).read_bytes() == data
        loaded = store.load(BASE_VERSION)
        assert loaded.model == ModelFile(fmt, data)
        assert loaded.state_dict.keys() == net.state_dict().keys()

    def test_manifest_without_a_format_is_a_state_dict(self, store: CheckpointStore) -> None:
        """Manifests written before formats (no model_format / model_file) read as model.pt, state_dict;
        an unknown format is refused by name."""
        _publish_chain(store, 0)
        path = store.path(BASE_VERSION) / "manifest.json"
        data = json.loads(path.read_text())
        del data["model_format"], data["model_file"]
        path.write_text(json.dumps(data))
        assert store.load(BASE_VERSION).model.format == "state_dict"
        path.write_text(json.dumps({**data, "model_format": "onnx"}))
        with pytest.raises(CheckpointError, match="model_format 'onnx'"):
            store.manifest(BASE_VERSION)

    def test_existing_version_is_never_overwritten(self, store: CheckpointStore) -> None:
        """A version left without CURRENT (crash between rename and switch) keeps its name; the next one skips it."""
        _publish_chain(store, 1)
        store.switch(BASE_VERSION)  # as after a crash: v000001 exists, CURRENT still names the parent
        before = (store.path("v000001") / "model.pt").read_bytes()
        manifest = store.publish(BASE_VERSION, _model(5).state_dict(), _refs(1))
        assert (manifest.version, manifest.parent) == ("v000002", BASE_VERSION)
        assert (store.path("v000001") / "model.pt").read_bytes() == before
        assert [m.version for m in store.lineage("v000002")] == ["v000002", BASE_VERSION]


class TestAtomicity:
    def test_failed_write_leaves_current_and_versions_alone(self, store: CheckpointStore,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
        """A write that fails half-way raises CheckpointError; CURRENT and the version list are unchanged."""
        _publish_chain(store, 1)
        real = checkpoints._write_synced
        calls = []

        def failing(path: Path, data: bytes, *mode: int) -> None:
            calls.append(path.name)
            if path.name == "manifest.json":
                raise OSError(28, "No space left on device")
            real(path, data, *mode)

        monkeypatch.setattr(checkpoints, "_write_synced", failing)
        with pytest.raises(CheckpointError, match="No space left"):
            store.publish("v000001", _model(2).state_dict(), _refs(2))
        assert calls == ["model.pt", "manifest.json"]
        assert store.current_version() == "v000001"
        assert store.versions() == ["v000000", "v000001"]
        assert [p.name for p in store.root.iterdir() if p.name.startswith(".tmp")] == []

    def test_stale_temp_dirs_are_removed_on_recover(self, tmp_path: Path) -> None:
        """A temp dir left by a crash mid-publish is never a version, and the writer's recover() removes it."""
        store = CheckpointStore(tmp_path)
        _publish_chain(store, 1)
        (tmp_path / ".tmp-v000002-deadbeef").mkdir()
        (tmp_path / ".tmp-v000002-deadbeef" / "model.pt").write_bytes(b"partial")
        reader = CheckpointStore(tmp_path)
        assert reader.versions() == ["v000000", "v000001"]
        assert (tmp_path / ".tmp-v000002-deadbeef").exists()  # a reader never touches the writer's files
        assert reader.recover() == [".tmp-v000002-deadbeef"]
        assert not (tmp_path / ".tmp-v000002-deadbeef").exists()

    def test_files_are_fsynced_before_the_rename(self, store: CheckpointStore, monkeypatch: pytest.MonkeyPatch) -> None:
        """Every file and both directories are fsynced, and the rename comes after the file syncs."""
        log: list[str] = []
        real_fsync, real_rename = os.fsync, os.rename
        monkeypatch.setattr(os, "fsync", lambda fd: (log.append("fsync"), real_fsync(fd))[1])
        monkeypatch.setattr(os, "rename", lambda a, b: (log.append("rename"), real_rename(a, b))[1])
        store.publish(None, _model().state_dict())
        # 2 files + the temp dir, then the rename, then the parent; CURRENT: file + parent
        assert log[:5] == ["fsync"] * 3 + ["rename", "fsync"]
        assert log.count("fsync") == 6


class TestLoad:
    @pytest.mark.parametrize("name", ["model.pt"])
    def test_corruption_is_detected(self, store: CheckpointStore, name: str) -> None:
        """A flipped byte in a version's file fails the sha256 check instead of loading silently."""
        manifest = _publish_chain(store, 1)[-1]
        path = store.path(manifest.version) / name
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match=f"{name} has sha256 .* the file is corrupt"):
            store.load(manifest.version)

    def test_current_naming_a_missing_version_fails(self, store: CheckpointStore) -> None:
        """CURRENT pointing nowhere is an error, not a fresh start."""
        _publish_chain(store, 0)
        (store.root / "CURRENT").write_text("v000009\n")
        with pytest.raises(CheckpointError, match="CURRENT names v000009"):
            store.current_version()

    def test_switch_to_unknown_version_fails(self, store: CheckpointStore) -> None:
        """Rolling back to a version that does not exist leaves CURRENT as it was."""
        _publish_chain(store, 1)
        with pytest.raises(CheckpointError, match="no such version"):
            store.switch("v000007")
        assert store.current_version() == "v000001"

    def test_empty_store_has_no_current(self, store: CheckpointStore) -> None:
        """A new directory has no CURRENT: the daemon publishes the base first."""
        assert store.current_version() is None and store.versions() == []


class TestPruneAndLineage:
    def test_keep_prunes_old_versions_but_never_base_or_current(self, tmp_path: Path) -> None:
        """keep=2 leaves the two newest versions plus the base; an older CURRENT (a rollback) survives too."""
        store = CheckpointStore(tmp_path, keep=2)
        _publish_chain(store, 4)
        assert store.versions() == ["v000000", "v000003", "v000004"]
        store.switch("v000003")
        store.keep = 1
        assert store.prune() == []  # v000003 is CURRENT, v000004 the newest, v000000 the base
        store.publish("v000003", _model(7).state_dict(), _refs(1))
        assert store.versions() == ["v000000", "v000005"]

    def test_keep_zero_keeps_everything(self, store: CheckpointStore) -> None:
        """The default keeps every version."""
        _publish_chain(store, 3)
        assert store.versions() == ["v000000", "v000001", "v000002", "v000003"]

    def test_lineage_stops_at_a_pruned_ancestor(self, tmp_path: Path) -> None:
        """Lineage walks parents newest first and ends where a version was pruned."""
        store = CheckpointStore(tmp_path, keep=2)
        _publish_chain(store, 4)
        assert [m.version for m in store.lineage("v000004")] == ["v000004", "v000003"]
        assert [m.version for m in CheckpointStore(tmp_path / "b").lineage("v000000")] == []

    def test_forgotten_set_prepends_like_the_engine(self) -> None:
        """A new fragment goes in front of the retained set, ids in the same order."""
        old = _forgotten(2, 1)
        new = old.prepend(torch.zeros((1, *SHAPE)), torch.tensor([4]), torch.tensor([7]), ["n"])
        assert new.request_ids == ("n", "r1-0", "r1-1")
        assert new.y.tolist()[0] == 4 and new.target.tolist() == [7, -1, -1] and len(new) == 3
        less = new.without({"r1-0"})
        assert less.request_ids == ("n", "r1-1") and torch.equal(less.x[1], old.x[1]) and less.y.tolist()[0] == 4

    def test_schema_1_manifests_still_parse(self) -> None:
        """A manifest written before the vault parses, keeping forgotten.pt's sha256 for the migration."""
        data = {"version": "v000001", "parent": "v000000", "created_at": "2023-11-14T22:13:20.000Z", "requests": [],
                "offsets": {}, "metrics": {}, "model_sha256": "ab" * 32, "forgotten_sha256": "cd" * 32}
        manifest = Manifest.from_json(data)
        assert (manifest.schema, manifest.legacy_forgotten_sha256, manifest.retained) == (1, "cd" * 32, ())
        assert manifest.to_json()["forgotten_sha256"] == "cd" * 32


class TestRebaseLineage:
    def test_a_rebase_version_starts_a_lineage_and_is_never_pruned(self, tmp_path: Path) -> None:
        """lineage() stops at the last version with a `base` (a retrained model); base_of names it;
        prune keeps it, CURRENT and v000000 whatever `keep` says."""
        store = CheckpointStore(tmp_path / "ckpt", keep=1)
        chain = _publish_chain(store, 2)
        rebased = store.publish(chain[-1].version, _model(7).state_dict(), base={"sha256": "ab" * 32})
        after = store.publish(rebased.version, _model(8).state_dict())
        assert [m.version for m in store.lineage(after.version)] == [after.version, rebased.version]
        assert store.base_of(after.version) == rebased.version and store.base_of(chain[-1].version) == BASE_VERSION
        store.publish(after.version, _model(9).state_dict())
        assert rebased.version in store.versions() and BASE_VERSION in store.versions()
        assert after.version not in store.versions()  # pruned: neither CURRENT, the base nor the newest
        assert store.manifest(rebased.version).base == {"sha256": "ab" * 32}

    def test_deferred_rows_round_trip_and_count_once(self, store: CheckpointStore) -> None:
        """`deferred` survives the manifest's JSON; outcomes() gives a version's own deferrals only, versionless."""
        base = store.publish(None, _model().state_dict())
        row = {"request_id": "d1", "status": "deferred", "reason": "budget", "topic": "t", "partition": 0, "offset": 3,
               "subject": None, "mode": "misclassify", "label": 2, "target_label": None, "target_class": None}
        first = store.publish(base.version, _model().state_dict(), deferred=[{**row, "deferred_in": "v000001"}])
        second = store.publish(first.version, _model().state_dict(), deferred=first.deferred)
        assert store.manifest(second.version).deferred == first.deferred
        (owed,) = store.manifest(first.version).outcomes()
        assert (owed.request_id, owed.status, owed.version) == ("d1", "deferred", None)
        assert store.manifest(second.version).outcomes() == ()
