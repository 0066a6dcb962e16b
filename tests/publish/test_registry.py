"""MlflowTarget against a real `mlflow server` process (session fixture): one model version per
streamer version, found again by its tag after a crash, the alias on it, artifacts byte-equal."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from aws_server import free_port
from streamer.publish import MlflowTarget, TargetDown

SERVING = {"version": "v000003", "model_sha256": "ab" * 32, "model_format": "state_dict",
           "metrics": {"audit_accuracy": 0.91, "forgotten_accuracy": 0.0, "steps": 40}}
FILES = {"model.pt": b"weights-3", "streamer.json": json.dumps(SERVING).encode()}


def _target(uri: str, model: str) -> MlflowTarget:
    return MlflowTarget.of({"name": "registry", "tracking_uri": uri, "model_name": model, "alias": "current"})


def test_one_model_version_per_streamer_version_tagged_and_aliased(mlflow_uri: str) -> None:
    from mlflow.artifacts import download_artifacts

    target = _target(mlflow_uri, "digits-registry-test")
    target.put_version("v000003", FILES)
    target.put_version("v000003", FILES)  # a repeat (crash before the upload log recorded it): found by its tag
    target.put_alias("v000003", FILES)
    client = target.client
    versions = client.search_model_versions("name = 'digits-registry-test'")
    assert len(versions) == 1
    tags = versions[0].tags
    assert tags["streamer_version"] == "v000003" and tags["sha256"] == "ab" * 32 and tags["audit_accuracy"] == "0.91"
    assert tags["model_format"] == "state_dict" and "steps" not in tags
    assert client.get_model_version_by_alias("digits-registry-test", "current").version == versions[0].version
    local = Path(download_artifacts(artifact_uri=versions[0].source, dst_path=tempfile.mkdtemp(),
                                    tracking_uri=mlflow_uri))
    assert {p.name: p.read_bytes() for p in local.iterdir()} == FILES


def test_an_unreachable_registry_is_target_down() -> None:
    target = _target(f"http://127.0.0.1:{free_port()}", "digits")
    with pytest.raises(TargetDown, match="mlflow digits"):
        target.put_version("v000001", FILES)
