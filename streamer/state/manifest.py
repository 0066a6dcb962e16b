"""What a checkpoint version is: its name, its manifest, its forgotten set (data only, no I/O).

    manifest.json   version, parent, created_at, the requests it applied with their outcomes,
                    the consumed offsets {topic: {partition: next_offset}}, metrics, the model
                    file's name, format and sha256, the retained forgotten set as references into
                    the forget vault (request id, keyed content digest, where and when applied,
                    goal met), and the rolled-back requests still to replay from the vault;
                    once `streamer verify --attacks` has run on it, a summary of each attack
                    report, one per reference model (`attacks`, absent before: see
                    `CheckpointStore.record_attacks`)

A version holds no instance data (schema 2). Schema 1 versions kept the retained set in plaintext
in forgotten.pt; the daemon migrates them into the vault at start (`state/migrate.py`).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import structlog
import torch

from ..errors import StreamerError
from .outcome import RequestOutcome

MODEL_FILE = "model.pt"
MODEL_FILES = {"state_dict": MODEL_FILE, "torchscript": MODEL_FILE, "export": "model.pt2"}  # by format
FORGOTTEN_FILE = "forgotten.pt"
MANIFEST_FILE = "manifest.json"
CURRENT_FILE = "CURRENT"
BASE_VERSION = "v000000"
MANIFEST_SCHEMA = 2
_VERSION = re.compile(r"v(\d{6,})")
_TEMP_PREFIX = ".tmp-"

Offsets = Mapping[str, Mapping[int, int]]  # {topic: {partition: next offset to consume}}

__all__ = ["BASE_VERSION", "Checkpoint", "CheckpointError", "ForgottenSet", "Manifest", "ModelFile", "Offsets",
           "RetainedRef", "format_version", "parse_rfc3339", "rfc3339", "version_number"]

log = structlog.get_logger()


class CheckpointError(StreamerError):
    """A version is missing, corrupt or cannot be written: stop without committing offsets."""


def format_version(number: int) -> str:
    return f"v{number:06d}"


def version_number(version: str) -> int:
    match = _VERSION.fullmatch(version)
    if match is None:
        raise CheckpointError(f"{version!r} is not a version name (v000000, v000001, ...)")
    return int(match.group(1))


def rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_rfc3339(text: str) -> float:
    """Unix seconds of an RFC 3339 time as `rfc3339` writes it."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True)
class ForgottenSet:
    """Every instance forgotten so far, newest fragment first (the engine's order)."""

    x: torch.Tensor  # (N, C, H, W) pixels in [0, 1]
    y: torch.Tensor  # (N,) original labels
    target: torch.Tensor  # (N,) -1: misclassify, c: relabel to c (or, for an unseen request, its resolved class)
    request_ids: tuple[str, ...] = ()
    unseen: frozenset[str] = frozenset()  # the request ids whose goal is unseen (target: the class it resolved to)

    def __len__(self) -> int:
        return len(self.y)

    @staticmethod
    def empty(input_shape: Sequence[int]) -> ForgottenSet:
        return ForgottenSet(torch.zeros((0, *input_shape)), torch.zeros(0, dtype=torch.int64),
                            torch.zeros(0, dtype=torch.int64), ())

    def prepend(self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor, request_ids: Sequence[str],
                unseen: Iterable[str] = ()) -> ForgottenSet:
        """This set with a new fragment in front, as `Unlearner` concatenates [fragment, retained]
        (`unseen`: those of `request_ids` whose goal is unseen, `target` their resolved class)."""
        return ForgottenSet(torch.cat([x.cpu(), self.x]), torch.cat([y.cpu(), self.y]),
                            torch.cat([target.cpu(), self.target]), (*request_ids, *self.request_ids),
                            self.unseen | frozenset(unseen))

    def without(self, request_ids: set[str]) -> ForgottenSet:
        """This set less the given ids (shredded), order kept."""
        keep = [i for i, rid in enumerate(self.request_ids) if rid not in request_ids]
        index = torch.tensor(keep, dtype=torch.int64)
        return ForgottenSet(self.x[index], self.y[index], self.target[index], tuple(self.request_ids[i] for i in keep),
                            self.unseen - request_ids)

    def to_state(self) -> dict[str, Any]:
        return {"x": self.x.cpu(), "y": self.y.cpu(), "target": self.target.cpu(), "request_ids": list(self.request_ids)}

    @staticmethod
    def from_state(state: Any, where: str) -> ForgottenSet:
        if not isinstance(state, dict) or not {"x", "y", "target", "request_ids"} <= state.keys():
            raise CheckpointError(f"{where} does not hold x, y, target and request_ids")
        result = ForgottenSet(state["x"], state["y"], state["target"], tuple(state["request_ids"]))
        if not len(result.x) == len(result.y) == len(result.target) == len(result.request_ids):
            raise CheckpointError(f"{where}: x, y, target and request_ids have different lengths")
        return result


@dataclass(frozen=True)
class RetainedRef:
    """One instance of a version's retained forgotten set: a reference into the forget vault."""

    request_id: str
    digest: str  # the vault entry's keyed content digest (state/sealed.py): binds the version to the content
    applied_in: str  # the version that applied it (after a rollback: the one that replayed it)
    applied_at: str  # RFC 3339, first applied (the vault entry's creation): the verification window starts here
    met: bool | None = None  # whether it met its goal on this version's weights (None: not evaluated)
    unseen: bool = False  # its goal is unseen (the vault holds the class it resolved to); JSON key only when true

    def to_json(self) -> dict[str, Any]:
        data = {"request_id": self.request_id, "digest": self.digest, "applied_in": self.applied_in,
                "applied_at": self.applied_at, "met": self.met}
        return {**data, "unseen": True} if self.unseen else data

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> RetainedRef:
        return RetainedRef(data["request_id"], data["digest"], data["applied_in"], data["applied_at"], data.get("met"),
                           data.get("unseen") is True)


@dataclass(frozen=True)
class ModelFile:
    """A version's model file: the user's network in `format` (state_dict | torchscript | export,
    see engine/formats.py), as the bytes written to disk."""

    format: str
    data: bytes = field(repr=False)

    @property
    def name(self) -> str:
        return MODEL_FILES[self.format]


@dataclass(frozen=True)
class Manifest:
    version: str
    parent: str | None
    created_at: str  # RFC 3339, UTC
    requests: tuple[Mapping[str, Any], ...]  # applied requests (forgotten | relabelled | failed)
    offsets: Offsets
    metrics: Mapping[str, Any]
    model_sha256: str
    duplicates: tuple[Mapping[str, Any], ...] = ()  # repeats answered with this version
    retained: tuple[RetainedRef, ...] = ()  # the retained forgotten set, newest fragment first (engine order)
    replay: tuple[Mapping[str, Any], ...] = ()  # rolled-back request entries still to re-apply from the vault
    # Earlier requests whose instance left the retained set here, goal unreachable (ledger: abandoned)
    abandoned: tuple[Mapping[str, Any], ...] = ()
    retained_misses: Mapping[str, int] = field(default_factory=dict)  # request_id -> fragments missed in a row
    # Requests deferred by the utility budget, owed (their instances in the vault), carried to every
    # later version until a rebase applies them; request rows as `requests` holds them
    deferred: tuple[Mapping[str, Any], ...] = ()
    # On a rebase version only: the retrained model it switched to ({"sha256", "audit_accuracy", ...});
    # it is this lineage's base (the distillation teacher and the audit baseline) from here on
    base: Mapping[str, Any] | None = None
    legacy_forgotten_sha256: str | None = None  # schema 1 only: the sha256 of its plaintext forgotten.pt
    # Attack-report summaries, one per reference model (cli/attacks.py writes them after publishing;
    # absent from manifests that never had one, and from every manifest written before them)
    attacks: tuple[Mapping[str, Any], ...] = ()
    schema: int = MANIFEST_SCHEMA
    model_format: str = "state_dict"  # absent in manifests written before formats: a state_dict
    model_file: str = MODEL_FILE
    format_recorded: bool = field(default=True, compare=False)  # False: read from a manifest without it

    @property
    def number(self) -> int:
        return version_number(self.version)

    @property
    def new_deferred(self) -> tuple[Mapping[str, Any], ...]:
        """The deferred rows this version itself recorded (its `deferred` is its parent's, then these)."""
        return tuple(d for d in self.deferred if d.get("deferred_in") == self.version)

    def outcomes(self) -> tuple[RequestOutcome, ...]:
        """Every outcome this version records (applied requests, repeats, abandoned instances, with
        this version; the requests it deferred, with none) and its time. Raises CheckpointError for
        a malformed row."""
        try:
            held = [RequestOutcome.from_manifest(row, self.version, self.created_at)
                    for row in (*self.requests, *self.duplicates, *self.abandoned)]
            owed = [RequestOutcome.from_manifest(row, None, self.created_at) for row in self.new_deferred]
            return (*held, *owed)  # a deferred request is in no version: it has none
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"malformed manifest {self.version}: a request row {err!r}") from err

    def to_json(self) -> dict[str, Any]:
        data = {
            "schema": self.schema, "version": self.version, "parent": self.parent, "created_at": self.created_at,
            "requests": [dict(r) for r in self.requests], "duplicates": [dict(d) for d in self.duplicates],
            "offsets": {t: {str(p): o for p, o in sorted(parts.items())} for t, parts in sorted(self.offsets.items())},
            "metrics": dict(self.metrics), "model_sha256": self.model_sha256,
            "retained": [r.to_json() for r in self.retained], "replay": [dict(r) for r in self.replay],
            "abandoned": [dict(a) for a in self.abandoned], "retained_misses": dict(sorted(self.retained_misses.items())),
            "model_format": self.model_format, "model_file": self.model_file,
            "deferred": [dict(d) for d in self.deferred],
        }
        if self.base is not None:
            data["base"] = dict(self.base)
        if self.legacy_forgotten_sha256 is not None:
            data["forgotten_sha256"] = self.legacy_forgotten_sha256
        if self.attacks:
            data["attacks"] = [dict(a) for a in self.attacks]
        return data

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Manifest:
        """The manifest a JSON object holds. The names it gives files and directories are checked
        against what streamer itself writes (a version name, the model file of its format), so
        no path built from a manifest leaves its version directory. Raises CheckpointError."""
        _check_names(data)
        try:
            return Manifest(
                version=data["version"], parent=data["parent"], created_at=data["created_at"],
                requests=tuple(data["requests"]), duplicates=tuple(data.get("duplicates", ())),
                offsets={t: {int(p): int(o) for p, o in parts.items()} for t, parts in data["offsets"].items()},
                metrics=data["metrics"], model_sha256=data["model_sha256"],
                retained=tuple(RetainedRef.from_json(r) for r in data.get("retained", ())),
                replay=tuple(data.get("replay", ())), legacy_forgotten_sha256=data.get("forgotten_sha256"),
                schema=data.get("schema", 1), abandoned=tuple(data.get("abandoned", ())),
                retained_misses={str(k): int(v) for k, v in data.get("retained_misses", {}).items()},
                model_format=data.get("model_format", "state_dict"), model_file=data.get("model_file", MODEL_FILE),
                format_recorded="model_format" in data, attacks=_attack_entries(data.get("attacks", [])),
                deferred=tuple(data.get("deferred", ())), base=data.get("base"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CheckpointError(f"malformed manifest: {err!r}") from err


def _check_names(data: Mapping[str, Any]) -> None:
    """Raise CheckpointError unless `version` and `parent` are version names and `model_file` is
    the file streamer writes for `model_format` (an edited manifest cannot point at ../../kek.key)."""
    fmt = data.get("model_format", "state_dict")
    if fmt not in MODEL_FILES:
        raise CheckpointError(f"malformed manifest: model_format {fmt!r} is not one of {', '.join(MODEL_FILES)}")
    model_file = data.get("model_file", MODEL_FILE)
    if model_file != MODEL_FILES[fmt]:
        raise CheckpointError(f"malformed manifest: model_file {model_file!r} is not {MODEL_FILES[fmt]!r}, the file "
                              f"streamer writes for the {fmt} format")
    for key in ("version", "parent"):
        name = data.get(key)
        if not (name is None and key == "parent") and not (isinstance(name, str) and _VERSION.fullmatch(name)):
            raise CheckpointError(f"malformed manifest: {key} {name!r} is not a version name (v000000, v000001, ...)")


def _attack_entries(entries: Any) -> tuple[Mapping[str, Any], ...]:
    """The well-formed attack summaries (objects with a "reference"). `attacks` is advisory and
    rewritten in place by `verify --attacks`: a damaged one is logged and skipped, never a reason
    to refuse the version (it may be CURRENT)."""
    if not isinstance(entries, list):
        log.warning("manifest_attacks_ignored", reason=f"attacks is a {type(entries).__name__}, not a list")
        return ()
    good = tuple(e for e in entries if isinstance(e, Mapping) and "reference" in e)
    if len(good) != len(entries):
        log.warning("manifest_attacks_ignored", reason=f"{len(entries) - len(good)} entries without a reference")
    return good


@dataclass(frozen=True)
class Checkpoint:
    """A loaded version: its manifest and weights (the retained set is in the vault: `state/retained.py`)."""

    manifest: Manifest
    state_dict: dict[str, torch.Tensor] = field(repr=False)  # the weights in the model file, its keys as is
    path: Path = Path()
    model: ModelFile | None = field(default=None, repr=False)  # the model file itself, sha256 verified
