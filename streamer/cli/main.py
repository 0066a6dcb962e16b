"""`streamer` command line: one sub-command per job."""
from __future__ import annotations

import argparse
from typing import NoReturn
import os
import sys
import traceback
from pathlib import Path

from ..errors import StreamerError
from ..telemetry import configure_logging
from .commands import (_broker, _checkpoints, _demo, _erasure_report, _forgotten, _kek_rotate, _keygen, _produce, _rebase,
                       _rollback, _run, _train, _verify, _verify_attacks)


class _Parser(argparse.ArgumentParser):
    """Usage errors as every other failure: one `streamer: error: ...` line (the usage at its end), exit 2."""

    def error(self, message: str) -> NoReturn:
        usage = " ".join(self.format_usage().split())
        self.exit(2, f"streamer: error: {message} ({usage})\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="streamer", description=__doc__)
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
    gone = sub.add_parser("forgotten", help="the exclusion list a retraining needs: every request applied, retained, "
                                            "deferred or shredded, with its id, subject and sample reference")
    gone.add_argument("--config", required=True)
    gone.add_argument("--out", help="write it to this file (default: stdout)")
    gone.set_defaults(func=_forgotten)
    rebase = sub.add_parser("rebase", help="hand over to a model retrained without the deleted data: publish it as a "
                                           "version, carry or re-apply what the vault holds, apply deferred requests")
    rebase.add_argument("--weights", required=True, help="the retrained model's weights (as model.weights takes them)")
    rebase.add_argument("--excluded", required=True, help="the exclusion list it was trained without "
                        "(`streamer forgotten --out`); it must name every request the daemon applied or owes")
    rebase.add_argument("--config", required=True)
    rebase.add_argument("--timeout", type=float, default=900.0,
                        help="seconds to wait for a running daemon to carry it out (it does so between fragments)")
    rebase.set_defaults(func=_rebase)
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
    kek = sub.add_parser("kek", help="the forget vault's key-encryption key: rotate it")
    kek_sub = kek.add_subparsers(dest="kek_command", required=True)
    rotate = kek_sub.add_parser("rotate", help="re-wrap every live vault entry's data key under a new KEK (the "
                                "daemon stopped), exactly once across crashes; then optionally destroy the old KEK")
    rotate.add_argument("--config", required=True, help="the daemon's config; its privacy section names the old KEK")
    to = rotate.add_mutually_exclusive_group(required=True)
    to.add_argument("--to-file", metavar="PATH", help="the new KEK's file (`streamer keygen PATH`)")
    to.add_argument("--to-env", metavar="NAME", help="the new KEK in this environment variable")
    to.add_argument("--to-kms", metavar="KEY_ID", help="the new KEK: this KMS key (id, ARN or alias; AWS KMS API)")
    rotate.add_argument("--kms-region", help="with --to-kms: its region (default: boto3's)")
    rotate.add_argument("--kms-endpoint-url", help="with --to-kms: its endpoint (default: the region's AWS endpoint)")
    rotate.add_argument("--destroy-old", action="store_true", help="once every entry decrypts under the new KEK: "
                        "erase the old KEK's file, or schedule its KMS key's deletion")
    rotate.add_argument("--pending-window-days", type=int, default=7,
                        help="with --destroy-old and a KMS key: days until KMS deletes it (7-30; it refuses the key "
                             "at once)")
    rotate.set_defaults(func=_kek_rotate, usage_error=rotate.error)
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
    if args.func is _kek_rotate and not args.to_kms and (args.kms_region or args.kms_endpoint_url):
        args.usage_error("--kms-region and --kms-endpoint-url go with --to-kms")
    if getattr(args, "attacks", False):
        args.func = _verify_attacks
    from ..state import PRIVATE_UMASK  # here, not at the top: `streamer --help` stays fast

    os.umask(PRIVATE_UMASK)  # whatever a command or a library creates is the owner's alone (README "Security")
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
