"""An MLflow model registry as a publish target: one registered model version per streamer version.

For each streamer version the target creates a run in `experiment` (default "streamer") holding
the model file and `streamer.json` as artifacts under `model/`, then a model version of
`model_name` whose source is that artifact directory, tagged

    streamer_version  v000007          the version's name (how a repeat finds it: idempotent)
    sha256            the model file's  (the manifest's model_sha256)
    model_format      state_dict | torchscript | export
    audit_accuracy, forgotten_accuracy, audit_baseline_accuracy   from the manifest's metrics

and `put_alias` sets the registered model alias (MLflow >= 2.3 aliases; `models:/<name>@current`
is what a serving stack loads). MLflow numbers its model versions itself, so the link is the tag.
Credentials come from MLflow's own environment variables (MLFLOW_TRACKING_TOKEN, _USERNAME,
_PASSWORD, ...). Needs the `mlflow` extra (the client, mlflow-skinny, is enough).
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .targets import TargetDown

METRIC_TAGS = ("audit_accuracy", "forgotten_accuracy", "audit_baseline_accuracy")

__all__ = ["MlflowTarget"]


@dataclass
class MlflowTarget:
    name: str
    model: str
    alias: str
    experiment: str
    client: Any
    alias_after_verify: bool = False

    @staticmethod
    def of(settings: Mapping[str, Any]) -> MlflowTarget:
        """A target from its config section. Raises ImportError without mlflow."""
        # bounded retries (MLflow's default retries for minutes) and no URL printed on stdout (JSON logs)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        from mlflow import MlflowClient

        uri = settings["tracking_uri"]
        return MlflowTarget(settings["name"], settings["model_name"], settings.get("alias", "current"),
                            settings.get("experiment") or "streamer", MlflowClient(tracking_uri=uri, registry_uri=uri),
                            bool(settings.get("alias_after_verify", False)))

    def put_version(self, version: str, files: Mapping[str, bytes]) -> None:
        self._call(self._register, version, files)

    def put_alias(self, version: str, files: Mapping[str, bytes]) -> None:
        def move() -> None:
            registered = self._find(version) or self._register(version, files)
            self.client.set_registered_model_alias(self.model, self.alias, registered.version)
        self._call(move)

    def _call(self, fn: Any, *args: Any) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return fn(*args)
        except (MlflowException, OSError) as err:  # the server down, refusing, or the artifact store
            raise TargetDown(f"mlflow {self.model}: {type(err).__name__}: {str(err)[:300]}") from err

    def _find(self, version: str) -> Any:
        """The model version registered for `version`, or None."""
        found = self.client.search_model_versions(f"name = '{self.model}' and tag.streamer_version = '{version}'")
        return min(found, key=lambda mv: int(mv.version)) if found else None

    def _register(self, version: str, files: Mapping[str, bytes]) -> Any:
        existing = self._find(version)
        if existing is not None:  # a repeat after a crash between registering and recording it
            return existing
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(self.model)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        experiment = self.client.get_experiment_by_name(self.experiment)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(self.experiment)
        tags = self._tags(version, files)
        run = self.client.create_run(experiment_id, tags=tags, run_name=version)
        with tempfile.TemporaryDirectory(prefix="streamer-publish-") as directory:
            for name, data in files.items():
                (Path(directory) / name).write_bytes(data)
            self.client.log_artifacts(run.info.run_id, directory, "model")
        self.client.set_terminated(run.info.run_id)
        return self.client.create_model_version(self.model, f"{run.info.artifact_uri}/model", run.info.run_id,
                                                tags=tags)

    @staticmethod
    def _tags(version: str, files: Mapping[str, bytes]) -> dict[str, str]:
        from .mirror import SERVING_MANIFEST

        manifest = json.loads(files[SERVING_MANIFEST])
        tags = {"streamer_version": version, "sha256": manifest["model_sha256"],
                "model_format": manifest["model_format"]}
        metrics = manifest.get("metrics") or {}
        tags.update({k: str(metrics[k]) for k in METRIC_TAGS if metrics.get(k) is not None})
        return tags
