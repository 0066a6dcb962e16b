"""The `streamer` commands' handlers: each takes the parsed arguments and returns an exit status
(errors are raised; `main` turns them into one line)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ConfigError, StreamerError
from ..telemetry import configure_logging
from ..text import plural


def _train(args: argparse.Namespace) -> int:
    from ..engine import BENCHMARK_CANARIES
    from ..engine import train_reference

    canaries = BENCHMARK_CANARIES.get(args.dataset) if args.canaries else None
    if args.canaries and canaries is None:
        raise ConfigError(f"train --canaries: no benchmark canaries for {args.dataset} "
                          f"(have: {', '.join(BENCHMARK_CANARIES)})")
    suffix = "-canaries" if canaries else ""
    out = args.out or f"artifacts/{args.dataset}{suffix}.pt"
    report = train_reference(args.dataset, out, seed=args.seed, canaries=canaries, cached=not args.retrain)
    what = "cached (same recipe; --retrain to train again)" if report.get("cached") else f"saved, {report['seconds']} s"
    print(f"{out}: {what}; train accuracy {report['train_acc']:.3f}, audit accuracy {report['audit_acc']:.3f}, "
          f"{report['parameters']} parameters")
    if canaries:
        print(f"canaries: {len(report['canaries']['index'])}, predicted as their canary label: "
              f"{report['canary_label_acc']:.3f} (memorised), as their true class: {report['canary_true_acc']:.3f}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..service import run_daemon

    cfg = load_config(args.config)
    configure_logging(args.log_level or cfg.logging.level)
    return run_daemon(cfg)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.dataset, args.requests, args.workdir, args.seed)


def _broker(args: argparse.Namespace) -> int:
    import signal

    from ..kafka import Broker, BrokerError

    def stop(*_: object) -> None:  # `kill` stops it as Ctrl-C does, the broker first; once
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
        raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a shell starts background jobs with it ignored
        signal.signal(signum, stop)
    broker = Broker(port=args.port)
    try:
        broker.start()
        print(f"embedded Kafka-protocol broker (Tansu, in memory: its records end with it) at {broker.bootstrap}; "
              "Ctrl-C stops it", flush=True)
        status = broker.wait()
    except BrokerError as err:  # its first line says why; the rest is tansu's own output
        raise StreamerError(str(err).splitlines()[0]) from err
    except KeyboardInterrupt:
        return 0
    finally:
        broker.stop()
    print(f"streamer: error: the broker exited with status {status}", file=sys.stderr)
    return 2


def _produce(args: argparse.Namespace) -> int:

    from ..config import load_config
    from .produce import dataset_events, file_events, prepare, send
    from ..intake import sample_context

    cfg = load_config(args.config)
    if args.file:
        items = list(file_events(Path(args.file)))
    else:
        indices = list(dict.fromkeys(args.index))  # one event per instance
        if len(indices) < len(args.index):
            n = len(args.index) - len(indices)
            print(f"note: dropped {n} repeated {'index' if n == 1 else 'indices'}: one event per index", file=sys.stderr)
        items = list(dataset_events(cfg, args.dataset, indices, args.prefix, args.relabel_to, args.mode))
    prepared = prepare(items, sample_context(cfg))
    invalid = [p for p in prepared if p.error]
    for p in invalid:
        print(f"invalid {p.where} (request_id {p.request_id or '?'}): {p.error}", file=sys.stderr)
    if invalid and not args.skip_invalid:
        print(f"nothing sent: {len(invalid)} of {plural(len(prepared), 'event')} invalid (--skip-invalid sends the rest)",
              file=sys.stderr)
        return 1
    if args.dry_run or len(invalid) == len(prepared):
        reason = "--dry-run" if args.dry_run else "no valid event"
        print(f"{plural(len(prepared) - len(invalid), 'valid event')}, nothing sent ({reason})")
        return 1 if invalid else 0
    for p, partition, offset in send(cfg, prepared):
        print(f"sent {p.request_id} ({p.where}) -> {cfg.kafka.topics.requests}[{partition}]@{offset}")
    return 1 if invalid else 0


def _checkpoints(args: argparse.Namespace) -> int:
    from ..state import CheckpointStore
    from ..config import load_config
    from .ops import list_versions, show_version

    store = CheckpointStore(load_config(args.config).checkpoints.dir)
    print(show_version(store, args.version) if args.action == "show" else list_versions(store))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from ..config import load_config
    from .ops import verify

    result = verify(load_config(args.config), args.version)
    audit = "-" if result.audit_accuracy is None else f"{result.audit_accuracy:.3f}"
    print(f"version {result.version} ({result.model_format}): {result.checked} retained instances checked, "
          f"audit accuracy {audit}; every file in its lineage matches its sha256")
    if result.non_finite:
        print(f"BROKEN: {result.non_finite} retained or audit instances get NaN/Inf logits from this version")
    if result.abandoned:
        print(f"ABANDONED: {len(result.abandoned)} requests left the retained set after missing their goal for "
              "unlearning.max_missed_fragments fragments (see the ledger): " + ", ".join(result.abandoned))
    if result.unverifiable:
        print(f"UNVERIFIABLE: {len(result.unverifiable)} applied requests are not in the retained forgotten set "
              f"(unlearning.retain_forgotten was off, or they were applied before it was on): "
              + ", ".join(result.unverifiable))
    if result.shredded:
        print(f"SHREDDED: {len(result.shredded)} requests left the vault when their verification window closed "
              "(neither pass nor fail): " + ", ".join(
                  f"{r.request_id} verified until {r.verified_version or 'never'}, shredded at {r.shredded_at}"
                  for r in result.shredded))
    if result.deferred:
        print(f"DEFERRED: {len(result.deferred)} requests are owed, not applied yet (the utility budget was reached; "
              "the next `streamer rebase` applies them): " + ", ".join(result.deferred))
    if result.came_back:
        print(f"CAME BACK: {len(result.came_back)} instances no longer meet their goal: " + ", ".join(result.came_back))
    if result.ok:
        print("OK: every request applied in this version's lineage and still in the vault is still forgotten / "
              "relabelled")
    return result.exit_code


def _verify_attacks(args: argparse.Namespace) -> int:
    """`verify --attacks`: verify as usual (same output, same exit code), then the attacks. A
    --reference file is loaded first, so a bad one fails before anything runs."""
    from ..config import load_config
    from .attacks import attack_table, retrained_reference, verify_attacks

    cfg = load_config(args.config)
    reference = retrained_reference(cfg, args.reference) if args.reference else None
    code = _verify(args)
    run = verify_attacks(cfg, args.version, reference=reference)
    report = run.report
    print(f"\nattacks on {run.version}:")
    print(f"  held-out data: {run.held_out}: the probes are fitted on it, relearning fine-tunes on "
          f"{report.relearn_samples} of it, the MIA and the AUCs compare against it")
    print(f"  forgotten: {report.forgotten} instances of the retained forgotten set (from the vault), "
          "with their training labels")
    print(f"  MIA: no retained training data configured; shadow model: {run.shadow}")
    print(f"  reference: {run.reference.describe()}")
    print(attack_table(run))
    for note in report.notes:
        print(f"note: {note}")
    print(f"wrote {run.path}; summary recorded in {run.version}'s manifest "
          f"(streamer checkpoints show {run.version} --config ...)")
    return code


def _rollback(args: argparse.Namespace) -> int:
    from ..config import load_config
    from .ops import rollback

    answer = rollback(load_config(args.config), args.to, args.force, args.timeout)
    print(answer["message"])
    return 0 if answer["ok"] else 1


def _forgotten(args: argparse.Namespace) -> int:
    import json

    from ..config import load_config
    from ..state import write_atomic
    from .ops import forgotten

    document = forgotten(load_config(args.config))
    text = json.dumps(document, indent=1, sort_keys=True) + "\n"
    if args.out is None:
        sys.stdout.write(text)
    else:
        write_atomic(Path(args.out), text.encode("utf-8"))
        print(f"{args.out}: {len(document['requests'])} requests to exclude from retraining (as of {document['current']})")
    return 0


def _rebase(args: argparse.Namespace) -> int:
    from ..config import load_config
    from .ops import rebase

    answer = rebase(load_config(args.config), args.weights, args.excluded, args.timeout)
    print(answer["message"])
    return 0 if answer["ok"] else 1


def _keygen(args: argparse.Namespace) -> int:
    from ..state import generate_kek_file

    kek = generate_kek_file(args.path)
    print(f"wrote a new 256-bit KEK to {args.path} (mode 0600, key id {kek.key_id}); keep a copy in your secret "
          "store: without it the vault cannot be read. Point privacy.kek_file at it.")
    return 0


def _kek_rotate(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..pipeline import faults
    from .kek import format_rotation, rotate_kek, target_privacy

    cfg = load_config(args.config)
    faults.arm()  # STREAMER_CRASH_AT=rotate_*: the rotation's crash points, for the kill -9 tests
    target = target_privacy(cfg, args.to_file, args.to_env, args.to_kms, args.kms_region, args.kms_endpoint_url)
    print(format_rotation(rotate_kek(cfg, target, args.destroy_old, args.pending_window_days, faults.crash_at)))
    return 0


def _erasure_report(args: argparse.Namespace) -> int:
    from ..config import load_config
    from .erasure import erasure_report, format_report, report_json

    report = erasure_report(load_config(args.config), args.request_id, args.subject, args.offline)
    print(report_json(report) if args.json else format_report(report))
    return 0 if report["requests"] or not (args.request_id or args.subject) else 1
