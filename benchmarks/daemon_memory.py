"""Resident memory of `streamer run` against requests served, over a long stream.

Starts the embedded broker and the daemon (a subprocess with the repository config.yaml's
unlearning and engine settings, the product defaults), sends N requests (distinct training
images of the dataset, misclassify, in one burst) and reads the daemon's VmRSS from
/proc/PID/status after every published fragment. The target (issue "Months of deletions"): the
resident memory after 1,000 requests at most 1.2x what it was after the first 100.

    python benchmarks/daemon_memory.py --dataset mnist5k --requests 1000     # ~20 min on 2 cores
    python benchmarks/daemon_memory.py --dataset digits --requests 200       # a few minutes

Prints a table and writes JSON (default runs/daemon_memory_DATASET.json).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from kafka import KafkaProducer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).parent))

from daemon_harness import DaemonProcess, new_topics, write_config  # noqa: E402
from daemon_latency import _weights  # noqa: E402
from kafka_broker import Broker  # noqa: E402
from streamer.engine.data import load_splits  # noqa: E402
from streamer.engine.models import REFERENCE_INPUT  # noqa: E402
from streamer.intake.events import encode_event  # noqa: E402

BOUND = 1.2


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def follow(daemon: DaemonProcess, total: int, timeout_s: float) -> list[dict]:
    """(requests answered, RSS MiB) after every published fragment, until `total` requests have an outcome."""
    samples: list[dict] = []
    seen = 0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        events = daemon.events()
        fragments = [e for e in events if e["event"] == "fragment_published"]
        answered = sum(1 for e in events if e["event"] == "request_outcome")
        if len(fragments) > seen:
            seen = len(fragments)
            samples.append({"fragment": seen, "requests": answered, "rss_mb": rss_mb(daemon.process.pid)})
            print(f"  fragment {seen}: {answered}/{total} answered, RSS {samples[-1]['rss_mb']} MiB",
                  file=sys.stderr, flush=True)
        if answered >= total:
            return samples
        if daemon.process.poll() is not None:
            raise SystemExit(f"the daemon exited ({daemon.process.returncode}):\n{daemon.tail()}")
        time.sleep(0.5)
    raise SystemExit(f"only {seen} fragments within {timeout_s:.0f} s")


def at(samples: list[dict], requests: int) -> float | None:
    """RSS after the first fragment that brought the answered count to `requests` or more."""
    return next((s["rss_mb"] for s in samples if s["requests"] >= requests), None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["digits", "mnist5k"], default="mnist5k")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the daemon (default 1)")
    parser.add_argument("--timeout", type=float, default=7200.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = args.out or ROOT / "runs" / f"daemon_memory_{args.dataset}.json"
    repo = yaml.safe_load((ROOT / "config.yaml").read_text())
    splits = load_splits(args.dataset)
    work = Path(tempfile.mkdtemp(prefix="daemon-memory-"))
    weights = _weights(args.dataset, work)
    index = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(0))[:args.requests].tolist()
    with Broker() as broker:
        topics = new_topics(broker.bootstrap, "memory")
        config = write_config(work, broker.bootstrap, topics, weights, fast=False,
                              unlearning={**repo["unlearning"], **repo["engine"]},
                              model={"source": f"reference:{args.dataset}", "input_shape": list(REFERENCE_INPUT[args.dataset])},
                              data={"datasets": {args.dataset: {"builtin": args.dataset, "split": "train"}},
                                    "audit": {"builtin": args.dataset, "split": "audit"}})
        daemon = DaemonProcess(config, work / "daemon.log", threads=args.threads)
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
        try:
            daemon.wait_for("partitions_assigned", timeout_s=300)
            for n, i in enumerate(index):
                rid = f"mem-{n}"
                producer.send(topics["requests"], key=rid.encode(),
                              value=encode_event(rid, "misclassify", int(splits.train.y[i]), splits.train.x[i]))
            producer.flush()
            samples = follow(daemon, args.requests, args.timeout)
            daemon.stop(timeout_s=300)
        finally:
            producer.close()
            daemon.kill()
    first, hundred, end = samples[0]["rss_mb"], at(samples, 100), samples[-1]["rss_mb"]
    ratio = None if not hundred or not end else round(end / hundred, 3)
    result = {"dataset": args.dataset, "requests": args.requests, "threads": args.threads, "samples": samples,
              "rss_after_first_fragment_mb": first, "rss_after_100_mb": hundred, "rss_at_end_mb": end,
              "end_over_100": ratio, "bound": BOUND, "met": ratio is not None and ratio <= BOUND,
              "statuses": sorted({e.get("status") for e in daemon.events() if e["event"] == "request_outcome"})}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("| requests | first fragment MiB | after 100 MiB | at the end MiB | end / 100 | <= 1.2 |\n|---|---|---|---|---|---|")
    print(f"| {args.requests} | {first} | {hundred} | {end} | {ratio} | {'yes' if result['met'] else 'NO'} |")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
