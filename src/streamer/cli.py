"""`streamer` command line: one sub-command per job."""
from __future__ import annotations

import argparse
import sys

from .errors import StreamerError
from .logs import configure_logging


def _train(args: argparse.Namespace) -> int:
    from .train import train_reference

    out = args.out or f"artifacts/{args.dataset}.pt"
    report = train_reference(args.dataset, out, seed=args.seed)
    print(f"saved {out}: train accuracy {report['train_acc']:.3f}, audit accuracy {report['audit_acc']:.3f}, "
          f"{report['parameters']} parameters, {report['seconds']} s")
    return 0


def _run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .daemon import run_daemon

    cfg = load_config(args.config)
    configure_logging(args.log_level or cfg.logging.level)
    return run_daemon(cfg)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamer", description=__doc__)
    parser.add_argument("--log-level", default=None, help="debug | info | warning | error "
                        "(default: logging.level of the config for `run`, else info)")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a reference model on an offline dataset and save its weights")
    train.add_argument("dataset", choices=["digits", "mnist5k"])
    train.add_argument("--out", help="weights file (default artifacts/DATASET.pt)")
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(func=_train)
    run = sub.add_parser("run", help="run the daemon: consume deletion events, unlearn, publish versions")
    run.add_argument("--config", required=True, help="YAML config file (see config.yaml)")
    run.set_defaults(func=_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level or "info")
    try:
        return args.func(args)
    except StreamerError as err:
        print(f"streamer: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
