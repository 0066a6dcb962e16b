"""The mirror: every published version uploaded to each publish target, the alias kept on CURRENT.

A background thread, so a slow or absent target never blocks a deletion: the local version is
durable first (the commit), the upload follows. For each target it uploads, oldest first, every
version of CURRENT's lineage that the upload log (`uploads.py`) does not hold, then moves the target's alias
to CURRENT when it points elsewhere (after a rollback or a rebase too; with `alias_after_verify`, once
`streamer verify` recorded a pass for it: state/verified.py), recording each success.
A failure leaves the rest for the next attempt, after a backoff that doubles up to
MAX_BACKOFF_S; `streamer_publish_versions_behind{target}` counts what is missing (CURRENT's
alias included) and `StreamerPublishBehind` alerts. After a crash between a local publish and
its upload the log lacks the version, so the next start uploads it: uploads are idempotent, and
each version is recorded once.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..state import (LEDGER_FILE, MANIFEST_FILE, CheckpointStore, Manifest, pretty_json, read_verification, rfc3339,
                     version_number)
from ..telemetry import Metrics
from .targets import PublishTarget
from .uploads import UploadLog

FIRST_BACKOFF_S, MAX_BACKOFF_S = 2.0, 300.0
SERVING_MANIFEST = "streamer.json"  # beside the model file in every uploaded version
IDLE_PASS_S = 5.0  # a pass when nothing woke it: CURRENT moved by a command, a version pruned

__all__ = ["SERVING_MANIFEST", "Mirror", "serving_manifest"]


class Mirror:
    """Uploads in its own thread (`start`/`stop`); `nudge()` after a publish wakes it at once."""

    def __init__(self, store: CheckpointStore, targets: Sequence[PublishTarget], metrics: Metrics, log: Any,
                 clock: Callable[[], float] = time.time):
        self.store, self.targets, self._metrics, self._log, self._clock = store, list(targets), metrics, log, clock
        self._wake, self._stopping = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self._backoff = {t.name: 0.0 for t in self.targets}

    def start(self) -> None:
        if self.targets and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mirror", daemon=True)
            self._thread.start()

    def nudge(self) -> None:
        self._wake.set()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        log = UploadLog(self.store.root / LEDGER_FILE)
        try:
            while not self._stopping.is_set():
                waits = [self.sync(t, log) for t in self.targets]
                self._wake.wait(timeout=min(waits))
                self._wake.clear()
        finally:
            log.close()

    def sync(self, target: PublishTarget, log: UploadLog) -> float:
        """One pass for `target`: upload what is missing, move the alias; the seconds until the next
        pass (a backoff after a failure; a nudge, i.e. a new version, retries at once)."""
        try:
            owed = self._catch_up(target, log)
        except Exception as err:  # noqa: BLE001 - down, a version pruned meanwhile, a full disk: the thread goes on
            wait = min(MAX_BACKOFF_S, max(FIRST_BACKOFF_S, 2 * self._backoff[target.name]))
            self._backoff[target.name] = wait
            self._metrics.publish.failed(target.name)
            try:
                behind: int | None = self._missing(target, log)
                self._metrics.publish.set_behind(target.name, behind)
            except Exception:  # noqa: BLE001 - the count is unknown: the gauge keeps its last value
                behind = None
            self._log.warning("publish_target_down", target=target.name, error=f"{type(err).__name__}: {err}",
                              retry_in_s=wait, behind=behind)
            return wait
        self._backoff[target.name] = 0.0
        self._metrics.publish.set_behind(target.name, owed)
        return IDLE_PASS_S

    def _catch_up(self, target: PublishTarget, log: UploadLog) -> int:
        """Upload what `_pending` lists, oldest first, then move the alias; 1 if the alias still
        waits for a verify, else 0."""
        current, pending = self._pending(target, log)
        for version in pending:
            target.put_version(version, self._files(version))
            log.record(target.name, version, "version", rfc3339(self._clock()))
            self._log.info("version_uploaded", target=target.name, version=version)
        if current is not None and log.alias(target.name) != current and self._may_alias(target, current):
            target.put_alias(current, self._files(current))
            log.record(target.name, current, "alias", rfc3339(self._clock()))
            self._log.info("alias_moved", target=target.name, version=current)
        return 0 if current is None or log.alias(target.name) == current else 1

    def _may_alias(self, target: PublishTarget, version: str) -> bool:
        """The alias moves to CURRENT; with `alias_after_verify`, once `streamer verify` passed on it."""
        if not getattr(target, "alias_after_verify", False):
            return True
        record = read_verification(self.store.path(version))
        return record is not None and record.get("ok") is True and record.get("version") == version

    def _pending(self, target: PublishTarget, log: UploadLog) -> tuple[str | None, list[str]]:
        """CURRENT, and the versions of its lineage not uploaded yet, oldest first: walked back
        from CURRENT to the first uploaded (or pruned) one, so a pass reads no manifest when all is
        there. Only what was served: never an orphan (written, CURRENT never switched to it)."""
        current = self.store.current_version()
        done, pending, version = log.uploaded(target.name), [], current
        while version is not None and version not in done and (self.store.root / version / MANIFEST_FILE).is_file():
            pending.append(version)
            manifest = self.store.manifest(version)
            version = manifest.parent if manifest.base is None else None
        return current, pending[::-1]

    def _missing(self, target: PublishTarget, log: UploadLog) -> int:
        current, pending = self._pending(target, log)
        return len(pending) + (1 if current is not None and log.alias(target.name) != current else 0)

    def _files(self, version: str) -> dict[str, bytes]:
        manifest = self.store.manifest(version)
        model = (self.store.path(version) / manifest.model_file).read_bytes()
        return {manifest.model_file: model, SERVING_MANIFEST: serving_manifest(manifest)}


def serving_manifest(manifest: Manifest) -> bytes:
    """What a serving stack needs of a version, and nothing about who asked to be forgotten: the
    local manifest's request ids, subjects, offsets and vault references stay in the checkpoint
    directory (data minimisation, GDPR Art. 5(1)(c)); counts only."""
    data = {"schema": 1, "version": manifest.version, "number": version_number(manifest.version),
            "parent": manifest.parent, "created_at": manifest.created_at, "model_file": manifest.model_file,
            "model_format": manifest.model_format, "model_sha256": manifest.model_sha256,
            "metrics": dict(manifest.metrics), "requests_applied": len(manifest.requests),
            "retrained_base": None if manifest.base is None else manifest.base.get("sha256")}
    return pretty_json(data)
