"""Tests for streamer.state.retained and .migrate: manifests reference the vault; schema-1 plaintext
forgotten sets move into it. Real files, real AES, no mocks."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
import torch

from streamer.state.checkpoints import CheckpointError, CheckpointStore, ForgottenSet, RetainedRef
from streamer.state.kek import LocalKEK
from streamer.state.manifest import FORGOTTEN_FILE, MANIFEST_FILE, rfc3339
from streamer.state.migrate import migrate_legacy
from streamer.state.retained import Window, last_verified, load_retained, next_refs, referenced_ids
from streamer.state.vault import ForgetVault, VaultIntegrityError, VaultItem

SHAPE = (1, 4, 4)
KEY = bytes(range(32))
T0 = 1_700_000_000.0


def _items(ids: list[str], seed: int = 0) -> list[VaultItem]:
    g = torch.Generator().manual_seed(seed)
    return [VaultItem(rid, torch.rand(SHAPE, generator=g), i % 10, -1 if i % 2 else 3) for i, rid in enumerate(ids)]


def _forgotten(items: list[VaultItem]) -> ForgottenSet:
    return ForgottenSet(torch.stack([i.x for i in items]), torch.tensor([i.y for i in items]),
                        torch.tensor([i.target for i in items]), tuple(i.request_id for i in items))


@pytest.fixture()
def vault(tmp_path: Path) -> ForgetVault:
    return ForgetVault.open(tmp_path / "vault", LocalKEK(KEY), clock=lambda: T0)


@pytest.fixture()
def store(tmp_path: Path) -> CheckpointStore:
    store = CheckpointStore(tmp_path / "ckpt", clock=lambda: T0)
    store.publish(None, {"w": torch.zeros(2)})
    return store


class TestReferences:
    def test_a_published_version_loads_its_retained_set_from_the_vault(self, vault, store) -> None:
        """next_refs + publish + load_retained give back the instances bitwise, in the engine's order."""
        items = _items(["b", "a"])
        entries = {e.request_id: e for e in vault.put(items)}
        forgotten = _forgotten(items)
        refs = next_refs(forgotten, [True, False], (), entries, store.next_version())
        manifest = store.publish("v000000", {"w": torch.ones(2)}, refs)
        assert [(r.request_id, r.applied_in, r.met) for r in manifest.retained] == [
            ("b", "v000001", True), ("a", "v000001", False)]
        assert manifest.retained[0].applied_at == rfc3339(T0) and manifest.retained[0].digest == entries["b"].digest
        loaded, shredded = load_retained(vault, store.manifest("v000001"), SHAPE)
        assert loaded.request_ids == ("b", "a") and shredded == ()
        assert torch.equal(loaded.x, forgotten.x) and loaded.target.tolist() == forgotten.target.tolist()

    def test_carried_references_keep_where_they_were_applied(self, vault, store) -> None:
        """A later version keeps each older instance's applying version and time, with its new goal."""
        first = _items(["a"])
        refs1 = next_refs(_forgotten(first), [True], (), {e.request_id: e for e in vault.put(first)}, "v000001")
        second = _items(["b"], seed=1)
        entries = {e.request_id: e for e in vault.put(second)}
        refs2 = next_refs(_forgotten(second + first), [True, False], refs1, entries, "v000002")
        assert [(r.request_id, r.applied_in, r.met) for r in refs2] == [("b", "v000002", True), ("a", "v000001", False)]
        with pytest.raises(CheckpointError, match="neither in this fragment nor in the parent"):
            next_refs(_forgotten(_items(["z"])), [True], refs1, {}, "v000003")

    def test_unseen_goals_are_marked_through_versions_and_reloads(self, vault, store) -> None:
        """An unseen request's reference says so (the vault holds its resolved class): carried to later
        versions, through the manifest JSON, back into the loaded set; `without` drops the mark."""
        items = _items(["u", "m"])
        plain = _forgotten(items)
        forgotten = ForgottenSet.empty(SHAPE).prepend(plain.x, plain.y, plain.target, plain.request_ids, ["u"])
        assert forgotten.unseen == {"u"} and forgotten.request_ids == ("u", "m")
        refs = next_refs(forgotten, [True, True], (), {e.request_id: e for e in vault.put(items)}, "v000001")
        assert [r.unseen for r in refs] == [True, False]
        assert refs[0].to_json()["unseen"] is True and "unseen" not in refs[1].to_json()
        later = next_refs(forgotten, [True, True], refs, {}, "v000002")
        manifest = store.publish("v000000", {"w": torch.ones(2)}, later)
        loaded, _ = load_retained(vault, store.manifest(manifest.version), SHAPE)
        assert loaded.unseen == {"u"} and loaded.target.tolist() == [3, -1]
        assert loaded.without({"u"}).unseen == frozenset()

    def test_shredded_instances_are_left_out_and_named(self, vault, store) -> None:
        """load_retained skips an instance shredded since the version was published and names it."""
        items = _items(["a", "b"])
        refs = next_refs(_forgotten(items), [True, True], (), {e.request_id: e for e in vault.put(items)}, "v000001")
        manifest = store.publish("v000000", {"w": torch.ones(2)}, refs)
        vault.shred("a", "v000001")
        loaded, shredded = load_retained(vault, manifest, SHAPE)
        assert loaded.request_ids == ("b",) and shredded == ("a",)
        vault.shred("b", "v000001")
        loaded, shredded = load_retained(vault, manifest, SHAPE)
        assert len(loaded) == 0 and loaded.x.shape == (0, *SHAPE) and shredded == ("a", "b")

    def test_a_reference_to_other_content_fails(self, vault, store) -> None:
        """A manifest whose digest does not match the vault entry (or names no entry) raises VaultIntegrityError."""
        items = _items(["a"])
        vault.put(items)
        forged = RetainedRef("a", "0" * 64, "v000001", rfc3339(T0), True)
        with pytest.raises(VaultIntegrityError, match="holds other content"):
            load_retained(vault, store.publish("v000000", {"w": torch.ones(2)}, [forged]), SHAPE)
        ghost = RetainedRef("ghost", "0" * 64, "v000001", rfc3339(T0), True)
        with pytest.raises(VaultIntegrityError, match="has no such entry"):
            load_retained(vault, store.publish("v000001", {"w": torch.ones(2)}, [ghost]), SHAPE)

    def test_referenced_ids_include_the_replay_list(self, store) -> None:
        """The ids a version needs from the vault: its retained set and the requests it will replay."""
        manifest = store.publish("v000000", {"w": torch.ones(2)},
                                 [RetainedRef("a", "0" * 64, "v000001", rfc3339(T0))], replay=[{"request_id": "z"}])
        assert referenced_ids(manifest) == {"a", "z"}


class TestWindow:
    def test_days_and_fragments_whichever_first(self) -> None:
        """The window closes `days` after the first application, or after `fragments` later versions."""
        ref = RetainedRef("a", "0" * 64, "v000003", rfc3339(T0), True)
        days_only = Window(days=14.0)
        assert not days_only.closed(ref, 100, T0 + 14 * 86_400 - 1) and days_only.closed(ref, 3, T0 + 14 * 86_400)
        both = Window(days=14.0, fragments=2)
        assert not both.closed(ref, 4, T0) and both.closed(ref, 5, T0)
        assert Window(days=0.0).closed(ref, 3, T0)  # 0 days: shred right after the applying version

    def test_last_verified_walks_back_to_a_met_goal(self, store) -> None:
        """last_verified is the newest version of the lineage whose reference records the goal met."""
        def ref(met):
            return [RetainedRef("a", "0" * 64, "v000001", rfc3339(T0), met)]
        store.publish("v000000", {"w": torch.ones(2)}, ref(True))
        store.publish("v000001", {"w": torch.ones(2)}, ref(True))
        store.publish("v000002", {"w": torch.ones(2)}, ref(False))
        lineage = store.lineage("v000003")
        assert last_verified(lineage, "a") == "v000002" and last_verified(lineage, "nobody") is None


def _legacy_version(store: CheckpointStore, version: str, parent: str | None, forgotten: ForgottenSet,
                    requests: list[str]) -> bytes:
    """A schema-1 version directory as the daemon wrote it before the vault: forgotten.pt in plaintext."""
    directory = store.root / version
    directory.mkdir(parents=True)
    model = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, model)
    data = io.BytesIO()
    torch.save(forgotten.to_state(), data)
    (directory / "model.pt").write_bytes(model.getvalue())
    (directory / FORGOTTEN_FILE).write_bytes(data.getvalue())
    manifest = {"schema": 1, "version": version, "parent": parent, "created_at": rfc3339(T0 - 86_400),
                "requests": [{"request_id": r, "status": "forgotten", "topic": "t", "partition": 0, "offset": i}
                             for i, r in enumerate(requests)], "duplicates": [], "offsets": {}, "metrics": {},
                "model_sha256": hashlib.sha256(model.getvalue()).hexdigest(),
                "forgotten_sha256": hashlib.sha256(data.getvalue()).hexdigest()}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))
    (store.root / "CURRENT").write_text(f"{version}\n")
    return data.getvalue()


class TestMigration:
    def test_forgotten_pt_moves_into_the_vault_and_is_erased(self, tmp_path: Path, vault: ForgetVault) -> None:
        """Each schema-1 version's instances go into the vault, its manifest references them, forgotten.pt is gone,
        and no file of the checkpoint directory holds the pixels any more."""
        store = CheckpointStore(tmp_path / "legacy")
        items = _items(["a", "b"])
        _legacy_version(store, "v000000", None, ForgottenSet.empty(SHAPE), [])
        _legacy_version(store, "v000001", "v000000", _forgotten(items[:1]), ["a"])
        _legacy_version(store, "v000002", "v000001", _forgotten(items[::-1]), ["b"])
        assert migrate_legacy(store, vault) == ["v000000", "v000001", "v000002"]
        assert not list(store.root.rglob(FORGOTTEN_FILE))
        manifest = store.manifest("v000002")
        assert manifest.schema == 2 and manifest.legacy_forgotten_sha256 is None
        assert not manifest.format_recorded  # still "written before model formats" for rollback
        assert [(r.request_id, r.applied_in, r.met) for r in manifest.retained] == [
            ("b", "v000002", None), ("a", "v000001", None)]
        assert manifest.retained[1].applied_at == rfc3339(T0 - 86_400)  # the window starts at the first application
        loaded, _ = load_retained(vault, manifest, SHAPE)
        assert torch.equal(loaded.x, torch.stack([items[1].x, items[0].x]))
        pixels = items[0].x.numpy().astype("<f4").tobytes()
        assert not [p for p in store.root.rglob("*") if p.is_file() and pixels[:32] in p.read_bytes()]
        assert migrate_legacy(store, vault) == []  # nothing left to do

    def test_a_crash_after_the_manifest_replacement_only_erases(self, tmp_path: Path, vault: ForgetVault) -> None:
        """A forgotten.pt left beside a schema-2 manifest (crash before the erase) is erased on the next start."""
        store = CheckpointStore(tmp_path / "legacy")
        legacy = _legacy_version(store, "v000000", None, _forgotten(_items(["a"])), ["a"])
        migrate_legacy(store, vault)
        (store.root / "v000000" / FORGOTTEN_FILE).write_bytes(legacy)  # as if the erase never happened
        assert migrate_legacy(store, vault) == ["v000000"]
        assert not (store.root / "v000000" / FORGOTTEN_FILE).exists()
        assert [r.request_id for r in store.manifest("v000000").retained] == ["a"]

    def test_a_corrupt_forgotten_pt_stops_the_migration(self, tmp_path: Path, vault: ForgetVault) -> None:
        """A forgotten.pt that fails its sha256 raises CheckpointError and is left in place for an operator."""
        store = CheckpointStore(tmp_path / "legacy")
        _legacy_version(store, "v000000", None, _forgotten(_items(["a"])), ["a"])
        path = store.root / "v000000" / FORGOTTEN_FILE
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match="does not match its manifest's sha256"):
            migrate_legacy(store, vault)
        assert path.exists() and store.manifest("v000000").schema == 1

    def test_an_unmigrated_version_cannot_be_read_from_the_vault(self, tmp_path: Path, vault: ForgetVault) -> None:
        """load_retained refuses a schema-1 manifest with a message saying how to migrate."""
        store = CheckpointStore(tmp_path / "legacy")
        _legacy_version(store, "v000000", None, _forgotten(_items(["a"])), ["a"])
        with pytest.raises(CheckpointError, match="start the daemon once"):
            load_retained(vault, store.manifest("v000000"), SHAPE)
