"""`streamer verify VERSION --attacks [--reference FILE]`: the forgetting attacks of
`engine.verification` on a version's model, each number beside a reference model's.

    reference   a model retrained without the forgotten instances (--reference FILE, in the
                configured model's format), else the original model (the base version v000000)
    held-out    data.audit (labelled, never trained on)
    forgotten   the version's retained forgotten set, decrypted from the vault (needs the KEK),
                with their training labels
    MIA shadow  no retained training data is configured, so the MIA's shadow model is the
                original (it was trained on the forgotten instances)

The full report goes to VERSION/attacks.json (atomically; the latest run), and a summary of the
main numbers to the version's manifest (`attacks`, one entry per reference:
`CheckpointStore.record_attacks`), where `streamer checkpoints show VERSION` displays it.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from ..config import DaemonConfig
from ..engine import logits as predict_logits
from ..engine import load_model, published_model
from ..errors import ConfigError, ModelLoadError
from ..intake import load_dataset_ref, resolve_device
from ..state import (CheckpointError, CheckpointStore, fsync_dir, load_retained, open_vault, pretty_json, rfc3339,
                     write_atomic)
from .ops import _fmt

ATTACKS_FILE = "attacks.json"

__all__ = ["ATTACKS_FILE", "AttackRun", "Reference", "attack_table", "retrained_reference", "verify_attacks"]


@dataclass(frozen=True)
class Reference:
    """The model every attack is also run on."""

    model: nn.Module
    kind: str  # original (the base version) | retrained (a file given with --reference)
    name: str  # the base version, or the file's absolute path
    sha256: str  # of its model file
    format: str  # state_dict | torchscript | export

    def describe(self) -> str:
        if self.kind == "original":
            return f"original model {self.name} (no retrained reference given: --reference FILE)"
        return f"retrained model {self.name} ({self.format}, sha256 {self.sha256[:12]})"

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "name": self.name, "sha256": self.sha256, "format": self.format}


def retrained_reference(cfg: DaemonConfig, path: str | Path) -> Reference:
    """A model retrained without the forgotten instances, from a file in the configured model's
    format (model.format): a state_dict loaded into the configured network as model.weights is,
    a TorchScript or torch.export file loaded as its user loads it. Raises a one-line
    ModelLoadError naming the file."""
    path = Path(path).resolve()
    fmt = cfg.model.model_format
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ModelLoadError(f"--reference {path}: cannot read it: {err.strerror or err}") from err
    device = resolve_device(cfg.device)
    try:
        if fmt == "state_dict":
            model = load_model(replace(cfg.model, weights=str(path)), device)
        else:
            model = published_model(cfg.model, data, fmt, device)
    except ModelLoadError as err:
        said = str(err) if str(path) in str(err) else f"{path}: {err}"
        raise ModelLoadError(f"--reference (read as {fmt}, the configured model format): {said}") from err
    return Reference(model, "retrained", str(path), hashlib.sha256(data).hexdigest(), fmt)


@dataclass(frozen=True)
class AttackRun:
    version: str
    reference: Reference
    report: Any  # engine.verification.AttackReport
    path: Path  # where attacks.json was written
    held_out: str  # what the held-out data is
    shadow: str  # what the MIA's shadow model is


def verify_attacks(cfg: DaemonConfig, version: str | None = None, seed: int = 0,
                   reference: Reference | None = None) -> AttackRun:
    """Run the attacks on `version` (default CURRENT) and `reference` (default: the original model,
    the base version), write VERSION/attacks.json and record the summary in its manifest.

    Raises ConfigError without data.audit; CheckpointError when the base version is pruned (the
    original is the MIA's shadow), fewer than 2 forgotten instances remain in the vault, or the
    manifest cannot be rewritten; ModelLoadError when the reference's outputs do not have
    model.num_classes columns; VaultKeyError without the KEK."""
    from ..engine import attack_report

    if cfg.data.audit is None:
        raise ConfigError("verify --attacks needs data.audit (labelled held-out data) in the config")
    store = CheckpointStore(cfg.checkpoints.dir)
    version = version or store.current_version()
    if version is None:
        raise CheckpointError(f"no version in {cfg.checkpoints.dir}: nothing to verify")
    base = store.lineage(version)[-1]
    if base.parent is not None:
        raise CheckpointError(f"{version}'s lineage stops at {base.version}: its base version was pruned, "
                              "so there is no original model to compare with")
    checkpoint = store.load(version)
    forgotten, _ = load_retained(open_vault(cfg, writer=False), checkpoint.manifest, cfg.model.input_shape)
    if len(forgotten) < 2:
        raise CheckpointError(f"{version} retains {len(forgotten)} forgotten instances in the vault; the attacks "
                              "need >= 2 (shredded instances cannot be attacked)")
    device = resolve_device(cfg.device)
    model = published_model(cfg.model, checkpoint.model.data, checkpoint.model.format, device)
    original = store.load(base.version)
    original_model = published_model(cfg.model, original.model.data, original.model.format, device)
    if reference is None:
        reference = Reference(original_model, "original", base.version, original.manifest.model_sha256,
                              original.model.format)
    audit = load_dataset_ref(cfg.data.audit, cfg.model.input_shape)
    width = predict_logits(reference.model, audit.x[:1]).shape[1]
    if width != cfg.model.num_classes:
        raise ModelLoadError(f"the reference {reference.name} gives {width} logits, model.num_classes is "
                             f"{cfg.model.num_classes}: is it a model of this task?")
    report = attack_report(model, reference.model, forgotten.x, forgotten.y, audit.x, audit.y, seed=seed,
                           shadow=original_model)
    held_out = f"data.audit ({cfg.data.audit.describe()}, {report.held_out} instances)"
    at = rfc3339(time.time())
    path = store.path(version) / ATTACKS_FILE
    data = {"version": version, "reference": reference.name, "reference_kind": reference.kind,
            "reference_sha256": reference.sha256, "held_out": cfg.data.audit.describe(), "seed": seed, "at": at,
            **report.to_json()}
    try:
        write_atomic(path, pretty_json(data))
        fsync_dir(path.parent)
    except OSError as err:
        raise CheckpointError(f"cannot write {path}: {err}") from err
    store.record_attacks(version, {"reference": reference.to_json(), "at": at, "seed": seed, "held_out": held_out,
                                   "forgotten": report.forgotten, "metrics": report.summary()})
    return AttackRun(version, reference, report, path, held_out, f"original model {base.version}")


def attack_table(run: AttackRun) -> str:
    """The attack report as a markdown table: model vs reference, with what each number means."""
    r = run.report
    rows = [("forget accuracy (training labels)", r.forget_accuracy, "how many are still recognised"),
            ("probe recovery (penultimate features)", r.probe_recovery, "labels a linear probe reads back"),
            ("probe recovery (pre-head features)", r.probe_recovery_prehead, "the same, on the head's input"),
            *((f"relearning, {s} Adam steps", pair, "accuracy after fine-tuning on held-out data")
              for s, pair in r.relearn.items()),
            ("MIA-efficacy (SalUn SVC)", r.mia_efficacy, "fraction judged non-member"),
            ("loss-threshold AUC", r.loss_auc, "0.5 = like held-out"),
            ("Streisand AUC", r.streisand_auc, "0.5 = indistinguishable from held-out")]
    lines = [f"| attack | {run.version} | reference ({run.reference.kind}) | reading |", "|---|---|---|---|"]
    lines += [f"| {name} | {_fmt(p.model)} | {_fmt(p.reference)} | {reading} |" for name, p, reading in rows]
    return "\n".join(lines)
