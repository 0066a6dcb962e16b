"""Attack summaries in a version's manifest: CheckpointStore.record_attacks and Manifest.attacks.

A summary is recorded after the version was published (by `streamer verify --attacks`), so the
manifest file is rewritten in place, atomically, and must keep every other field as written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from streamer.state.checkpoints import CheckpointError, CheckpointStore
from streamer.state.manifest import Manifest


def _entry(kind: str = "original", value: float = 0.5) -> dict:
    return {"reference": {"kind": kind, "name": "v000000"}, "at": "2024-05-01T12:00:00.000Z",
            "metrics": {"streisand_auc": {"model": value, "reference": 0.5}}}


@pytest.fixture()
def store(tmp_path: Path) -> CheckpointStore:
    store = CheckpointStore(tmp_path / "ckpt", clock=lambda: 1_700_000_000.0)
    weights = {"w": torch.zeros(2)}
    store.publish(None, weights)
    store.publish("v000000", weights, requests=[{"request_id": "r1", "status": "forgotten"}], offsets={"t": {0: 3}})
    return store


def _raw(store: CheckpointStore, version: str = "v000001") -> dict:
    return json.loads((store.path(version) / "manifest.json").read_text())


def test_published_manifests_have_no_attacks_key(store: CheckpointStore) -> None:
    """Until attacks run, the manifest is as before: no `attacks` key, Manifest.attacks empty."""
    assert "attacks" not in _raw(store) and store.manifest("v000001").attacks == ()


def test_record_adds_replaces_by_reference_and_keeps_the_rest(store: CheckpointStore) -> None:
    """Recorded summaries read back; the same reference replaces, another one adds; every other
    field is unchanged; no temp file is left in the version directory."""
    before = _raw(store)
    returned = store.record_attacks("v000001", _entry())
    assert store.manifest("v000001") == returned and returned.attacks == (_entry(),)
    store.record_attacks("v000001", _entry(value=0.9))
    store.record_attacks("v000001", _entry("retrained", 0.6))
    after = _raw(store)
    assert after.pop("attacks") == [_entry(value=0.9), _entry("retrained", 0.6)]
    assert after == before
    assert sorted(p.name for p in store.path("v000001").iterdir()) == ["manifest.json", "model.pt"]
    assert store.manifest("v000001").to_json()["attacks"] == [_entry(value=0.9), _entry("retrained", 0.6)]
    store.verify_files("v000001")  # the model file still matches its sha256


def test_an_older_manifest_keeps_its_layout(store: CheckpointStore) -> None:
    """A manifest written before formats (no model_format / model_file): it loads, and recording
    attacks keeps it read as such (rollback must still see the format was not recorded)."""
    path = store.path("v000001") / "manifest.json"
    data = _raw(store)
    del data["model_format"], data["model_file"], data["retained_misses"], data["abandoned"]
    path.write_text(json.dumps(data))
    assert store.manifest("v000001").attacks == () and not store.manifest("v000001").format_recorded
    store.record_attacks("v000001", _entry())
    manifest = store.manifest("v000001")
    assert not manifest.format_recorded and manifest.attacks == (_entry(),)
    assert "model_format" not in _raw(store)


def test_schema_one_is_refused_and_malformed_attacks_are_skipped(store: CheckpointStore) -> None:
    """`attacks` is advisory: a damaged one never makes a version (perhaps CURRENT) unloadable."""
    path = store.path("v000001") / "manifest.json"
    data = _raw(store)
    path.write_text(json.dumps({**data, "schema": 1, "forgotten_sha256": "0" * 64}))
    with pytest.raises(CheckpointError, match="schema-1"):
        store.record_attacks("v000001", _entry())
    path.write_text(json.dumps({**data, "attacks": {"streisand": 1}}))
    assert store.manifest("v000001").attacks == ()
    assert Manifest.from_json({**data, "attacks": [{"no": "reference"}, _entry()]}).attacks == (_entry(),)
    assert store.record_attacks("v000001", _entry()).attacks == (_entry(),)  # the damaged value is replaced
