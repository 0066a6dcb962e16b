"""`streamer` command line: one sub-command per job."""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from ..errors import ConfigError, StreamerError
from ..service.logs import configure_logging
from ..text import plural


def _train(args: argparse.Namespace) -> int:
    from ..engine.canaries import BENCHMARK_CANARIES
    from ..engine.train import train_reference

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
    from ..service.daemon import run_daemon

    cfg = load_config(args.config)
    configure_logging(args.log_level or cfg.logging.level)
    return run_daemon(cfg)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.dataset, args.requests, args.workdir, args.seed)


def _broker(args: argparse.Namespace) -> int:
    import signal

    from ..service.broker import Broker, BrokerError

    def stop(*_: object) -> None:  # `kill` stops it as Ctrl-C does, the broker first; once
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
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
    from pathlib import Path

    from ..config import load_config
    from .produce import dataset_events, file_events, prepare, send
    from ..intake.resources import sample_context

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
    from ..state.checkpoints import CheckpointStore
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


def _keygen(args: argparse.Namespace) -> int:
    from ..state.kek import generate_kek_file

    kek = generate_kek_file(args.path)
    print(f"wrote a new 256-bit KEK to {args.path} (mode 0600, key id {kek.key_id}); keep a copy in your secret "
          "store: without it the vault cannot be read. Point privacy.kek_file at it.")
    return 0


def _erasure_report(args: argparse.Namespace) -> int:
    from ..config import load_config
    from .erasure import erasure_report, format_report, report_json

    report = erasure_report(load_config(args.config), args.request_id, args.subject, args.offline)
    print(report_json(report) if args.json else format_report(report))
    return 0 if report["requests"] or not (args.request_id or args.subject) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamer", description=__doc__)
    parser.add_argument("--log-level", default=None, help="debug | info | warning | error "
                        "(default: logging.level of the config for `run`, else info)")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a reference model on an offline dataset and save its weights")
    train.add_argument("dataset", choices=["digits", "mnist5k", "fashion"])
    train.add_argument("--out", help="weights file (default artifacts/DATASET.pt, or DATASET-canaries.pt); a "
                       "JSON report is written beside it")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--canaries", action="store_true", help="plant the benchmark's canaries (mnist5k, fashion)")
    train.add_argument("--retrain", action="store_true", help="train even when OUT holds a model of the same recipe")
    train.set_defaults(func=_train)
    run = sub.add_parser("run", help="run the daemon: consume deletion events, unlearn, publish versions")
    run.add_argument("--config", required=True, help="YAML config file (see config.yaml)")
    run.set_defaults(func=_run)
    demo = sub.add_parser("demo", help="the whole product on an embedded broker: requests in, versions and a summary out")
    demo.add_argument("--dataset", choices=["mnist5k", "digits"], default="mnist5k",
                      help="mnist5k (where unlearning quality means something) or digits (faster)")
    demo.add_argument("--requests", type=int, default=24, help="valid deletion requests to send (default 24)")
    demo.add_argument("--workdir", type=Path, help="where config, checkpoints, log and plot go (default runs/demo-TIME)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    broker = sub.add_parser("broker", help="run the embedded Kafka-protocol broker (Tansu, in memory) in the "
                                           "foreground, for `streamer run` and `streamer produce` on one machine")
    broker.add_argument("--port", type=_port, default=9092, help="on 127.0.0.1 (default 9092, config.yaml's)")
    broker.set_defaults(func=_broker)
    produce = sub.add_parser("produce", help="validate deletion events against a config, then send them")
    produce.add_argument("--config", required=True)
    source = produce.add_mutually_exclusive_group(required=True)
    source.add_argument("--file", help="JSONL file of schema-v1 events, one per line")
    source.add_argument("--dataset", help="a configured dataset name: send {dataset, index} samples")
    produce.add_argument("--index", type=int, nargs="+", default=[], help="with --dataset: the indices to forget")
    goal = produce.add_mutually_exclusive_group()
    goal.add_argument("--relabel-to", type=int, help="with --dataset: relabel to this class instead of misclassify")
    goal.add_argument("--mode", choices=["misclassify", "unseen"],
                      help="with --dataset: the goal (default: the config's unlearning.default_mode); unseen = where a "
                           "model that never saw the instance puts it")
    produce.add_argument("--prefix", default="", help="with --dataset: request_id prefix (id = PREFIX + DATASET-INDEX, "
                         "+ -relabel-T or -MODE for a goal other than the config's default)")
    produce.add_argument("--dry-run", action="store_true", help="validate only")
    produce.add_argument("--skip-invalid", action="store_true", help="send the valid events even if some are invalid")
    produce.set_defaults(func=_produce, usage_error=produce.error)
    ckpt = sub.add_parser("checkpoints", help="list versions, or show one manifest")
    ckpt.add_argument("action", choices=["list", "show"])
    ckpt.add_argument("version", nargs="?", help="with show: the version (e.g. v000003; default CURRENT)")
    ckpt.add_argument("--config", required=True)
    ckpt.set_defaults(func=_checkpoints)
    back = sub.add_parser("rollback", help="publish a new version with an older version's weights and replay "
                                           "every request accepted after it")
    back.add_argument("--to", required=True, help="the version to roll back to (an ancestor of CURRENT)")
    back.add_argument("--config", required=True)
    back.add_argument("--force", action="store_true",
                      help="when the topic no longer holds some records to replay: record them as rolled_back")
    back.add_argument("--timeout", type=float, default=900.0,
                      help="seconds to wait for a running daemon to carry it out (it does so between fragments)")
    back.set_defaults(func=_rollback)
    verify = sub.add_parser("verify", help="re-check that every request applied up to a version is still forgotten")
    verify.add_argument("version", nargs="?", help="default: CURRENT")
    verify.add_argument("--config", required=True)
    verify.add_argument("--attacks", action="store_true", help="also run the forgetting attacks (probes, relearning, "
                        "MIA, loss and Streisand AUC) against a reference model; writes VERSION/attacks.json and "
                        "a summary in the version's manifest")
    verify.add_argument("--reference", metavar="FILE", help="with --attacks: a model retrained without the forgotten "
                        "instances, in the configured model's format (default reference: the original model, the "
                        "base version)")
    verify.set_defaults(func=_verify)
    keygen = sub.add_parser("keygen", help="write a new random key-encryption key (KEK) for the forget vault")
    keygen.add_argument("path", help="where to write it (mode 0600; an existing file is never overwritten)")
    keygen.set_defaults(func=_keygen)
    report = sub.add_parser("erasure-report", help="per request: received, applied, verified, shredded, and where "
                                                   "copies may still exist")
    report.add_argument("--config", required=True)
    who = report.add_mutually_exclusive_group()
    who.add_argument("--request-id", help="only this request")
    who.add_argument("--subject", help="only the requests of this subject")
    report.add_argument("--json", action="store_true", help="JSON instead of text")
    report.add_argument("--offline", action="store_true", help="do not ask the brokers for the topics' retention")
    report.set_defaults(func=_erasure_report)
    return parser


def _port(text: str) -> int:
    """A TCP port for argparse: 0 (any free one) to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 0..65535 (0: any free port)")
    return port


def main(argv: list[str] | None = None) -> int:
    """Every failure is one `streamer: error: ...` line on stderr and exit status 2 (verify uses 1
    for "instances came back"); `--log-level debug` adds the traceback of unexpected errors."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "reference", None) and not args.attacks:
        parser.error("--reference goes with --attacks")
    if args.func is _produce:
        if args.dataset is not None and not args.index:
            args.usage_error("--dataset needs --index")
        dataset_only = [name for name, given in (("--index", args.index), ("--relabel-to", args.relabel_to is not None),
                                                 ("--mode", args.mode), ("--prefix", args.prefix)) if given]
        if args.file and dataset_only:
            args.usage_error(f"{', '.join(dataset_only)} {'goes' if len(dataset_only) == 1 else 'go'} with --dataset, "
                             "not --file")
    if getattr(args, "attacks", False):
        args.func = _verify_attacks
    configure_logging(args.log_level or "info")
    try:
        status = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers below
        return status
    except StreamerError as err:
        print(f"streamer: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("streamer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader (`| head`) closed the pipe: no error, and none at exit's flush either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as err:  # noqa: BLE001 - the one place that turns anything else into one line
        if (args.log_level or "info") == "debug":
            traceback.print_exc()
        name = type(err).__name__  # some errors (kafka-python's) already start with their name
        print(f"streamer: error: {err if str(err).startswith(name) else f'{name}: {err}'}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
