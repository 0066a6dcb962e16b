"""Event -> receipt latency and throughput of `streamer run` on this machine.

Starts the embedded broker and the daemon (a subprocess, the repository config.yaml's unlearning
settings unless --fast), then measures two things:

  burst   N requests produced at once: throughput (requests/min from the first send to the last
          receipt) and each request's send -> receipt latency (fragments of fragment_size queue up);
  single  K requests one at a time, each waiting for its receipt: the latency of a request that
          arrives alone (it waits max_wait_s for company, then unlearns a fragment of one).

    python benchmarks/daemon_latency.py --dataset digits --requests 64 --singles 3
    python benchmarks/daemon_latency.py --dataset mnist5k --requests 32 --singles 2

Prints a table and writes JSON (default runs/daemon_latency_DATASET.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from daemon_harness import DaemonProcess, new_topics, write_config  # noqa: E402
from kafka_broker import Broker  # noqa: E402
from streamer.engine.data import load_splits  # noqa: E402
from streamer.intake.events import encode_event  # noqa: E402
from streamer.engine.models import REFERENCE_INPUT  # noqa: E402


class Receipts:
    """A background consumer of the receipts topic: request_id -> (arrival time, receipt)."""

    def __init__(self, bootstrap: str, topic: str):
        self.arrived: dict[str, tuple[float, dict[str, Any]]] = {}
        self._stop = threading.Event()
        self._consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        tp = TopicPartition(topic, 0)
        self._consumer.assign([tp])
        self._consumer.seek(tp, 0)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for batch in self._consumer.poll(timeout_ms=50).values():
                now = time.time()
                for record in batch:
                    receipt = json.loads(record.value)
                    self.arrived.setdefault(receipt["request_id"], (now, receipt))

    def wait(self, request_ids: list[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not all(rid in self.arrived for rid in request_ids):
            if time.monotonic() > deadline:
                missing = [rid for rid in request_ids if rid not in self.arrived]
                raise SystemExit(f"no receipt within {timeout_s} s for {len(missing)} requests, e.g. {missing[:3]}")
            time.sleep(0.02)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._consumer.close()


def _weights(dataset: str, work: Path) -> Path:
    existing = ROOT / "artifacts" / f"{dataset}.pt"
    if existing.is_file():
        return existing
    from streamer.engine.train import train_reference

    print(f"training the {dataset} reference model (artifacts/{dataset}.pt is missing) ...", flush=True)
    torch.set_num_threads(1)
    train_reference(dataset, work / f"{dataset}.pt")
    return work / f"{dataset}.pt"


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    return {"min": round(ordered[0], 3), "p50": round(pick(0.5), 3), "p90": round(pick(0.9), 3),
            "max": round(ordered[-1], 3), "mean": round(statistics.fmean(ordered), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["digits", "mnist5k"], default="digits")
    parser.add_argument("--requests", type=int, default=64, help="burst size (default 64)")
    parser.add_argument("--singles", type=int, default=3, help="requests sent one at a time (default 3)")
    parser.add_argument("--relabel-every", type=int, default=4, help="every k-th request relabels (0: none)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the daemon (default 1)")
    parser.add_argument("--fast", action="store_true", help="the tests' small unlearning caps instead of config.yaml's")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for all receipts")
    parser.add_argument("--out", type=Path, help="JSON output (default runs/daemon_latency_DATASET.json)")
    args = parser.parse_args()
    out = args.out or ROOT / "runs" / f"daemon_latency_{args.dataset}.json"

    repo_config = yaml.safe_load((ROOT / "config.yaml").read_text())
    unlearning = {**repo_config["unlearning"], **repo_config["engine"]}
    splits = load_splits(args.dataset)
    work = Path(tempfile.mkdtemp(prefix="daemon-latency-"))
    weights = _weights(args.dataset, work)
    shape = list(REFERENCE_INPUT[args.dataset])
    total = args.requests + args.singles
    generator = torch.Generator().manual_seed(0)
    indices = torch.randperm(len(splits.train), generator=generator)[:total].tolist()

    def event(i: int) -> tuple[str, bytes]:
        index = indices[i]
        rid = f"bench-{i}"
        label = int(splits.train.y[index])
        target = (label + 1) % 10 if args.relabel_every and i % args.relabel_every == args.relabel_every - 1 else None
        return rid, encode_event(rid, "relabel" if target is not None else "misclassify", label,
                                 splits.train.x[index], target_label=target)

    with Broker() as broker:
        topics = new_topics(broker.bootstrap, "bench")
        config = write_config(
            work, broker.bootstrap, topics, weights, fast=args.fast,
            unlearning=None if args.fast else unlearning,
            model={"source": f"reference:{args.dataset}", "input_shape": shape},
            data={"datasets": {args.dataset: {"builtin": args.dataset, "split": "train"}},
                  "audit": {"builtin": args.dataset, "split": "audit"}},
        )
        daemon = DaemonProcess(config, work / "daemon.log", threads=args.threads)
        receipts = Receipts(broker.bootstrap, topics["receipts"])
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=0)
        sent: dict[str, float] = {}
        try:
            started = time.monotonic()
            daemon.wait_for("partitions_assigned", timeout_s=300)
            startup_s = time.monotonic() - started
            burst = [event(i) for i in range(args.requests)]
            for rid, value in burst:
                sent[rid] = time.time()
                producer.send(topics["requests"], key=rid.encode(), value=value)
            producer.flush()
            receipts.wait([rid for rid, _ in burst], args.timeout)
            singles = []
            for i in range(args.requests, total):
                rid, value = event(i)
                sent[rid] = time.time()
                producer.send(topics["requests"], key=rid.encode(), value=value).get(timeout=30)
                receipts.wait([rid], args.timeout)
                singles.append(rid)
            daemon.wait_for("request_outcome", count=total, timeout_s=60)
            code = daemon.stop(timeout_s=300)
        finally:
            producer.close()
            receipts.close()
            daemon.kill()

    burst_ids = [rid for rid, _ in burst]
    burst_latency = [receipts.arrived[rid][0] - sent[rid] for rid in burst_ids]
    burst_span = max(receipts.arrived[rid][0] for rid in burst_ids) - min(sent[rid] for rid in burst_ids)
    single_latency = [receipts.arrived[rid][0] - sent[rid] for rid in singles]
    statuses: dict[str, int] = {}
    for rid in burst_ids + singles:
        status = receipts.arrived[rid][1]["status"]
        statuses[status] = statuses.get(status, 0) + 1
    fragments = [e for e in daemon.events() if e["event"] == "fragment_published"]
    loaded = [e for e in daemon.events() if e["event"] == "checkpoint_loaded"]
    result = {
        "dataset": args.dataset, "requests_burst": args.requests, "requests_single": args.singles,
        "fragment_size": (unlearning if not args.fast else {"fragment_size": 4})["fragment_size"],
        "unlearning": "tests' fast caps" if args.fast else {k: v for k, v in unlearning.items()},
        "daemon_threads": args.threads, "exit_code": code, "startup_to_assignment_s": round(startup_s, 2),
        "burst": {"seconds": round(burst_span, 2), "requests_per_min": round(60 * args.requests / burst_span, 1),
                  "latency_s": _percentiles(burst_latency),
                  "latencies_s": [round(v, 3) for v in burst_latency]},
        "single": {"latency_s": _percentiles(single_latency)} if single_latency else None,
        "statuses": statuses,
        "fragments": [{"version": e["version"], "requests": e["requests"], "stopped_by": e["stopped_by"],
                       "steps": e["steps"], "seconds": e["seconds"], "audit_accuracy": e["accuracies"].get("audit")}
                      for e in fragments],
        "audit_baseline": loaded[0]["audit_baseline"] if loaded else None,
        "machine": {"cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
                    "python": platform.python_version(), "torch": torch.__version__},
        "daemon_log": str(work / "daemon.log"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    steps = [f["steps"] for f in result["fragments"]]
    secs = [f["seconds"] for f in result["fragments"]]
    audit = result["fragments"][-1]["audit_accuracy"] if fragments else None
    rows = [
        ("dataset", args.dataset),
        ("fragment_size / max_wait_s", f"{result['fragment_size']} / {unlearning['max_wait_s'] if not args.fast else 2.0}"),
        ("burst requests", args.requests),
        ("burst wall time (s)", result["burst"]["seconds"]),
        ("throughput (requests/min)", result["burst"]["requests_per_min"]),
        ("burst latency min / p50 / p90 / max (s)", "{min} / {p50} / {p90} / {max}".format(**result["burst"]["latency_s"])),
        ("single-request latency p50 / max (s)",
         "{p50} / {max}".format(**result["single"]["latency_s"]) if result["single"] else "-"),
        ("fragments / steps mean / s mean", f"{len(fragments)} / {statistics.fmean(steps) if steps else 0:.0f} / "
                                            f"{statistics.fmean(secs) if secs else 0:.1f}"),
        ("stopped_by", ", ".join(f"{k}={v}" for k, v in sorted(
            {s: [f["stopped_by"] for f in result["fragments"]].count(s) for s in {f["stopped_by"] for f in result["fragments"]}}.items()))),
        ("statuses", ", ".join(f"{k}={v}" for k, v in sorted(statuses.items()))),
        ("audit accuracy: baseline -> last", f"{result['audit_baseline']} -> {audit}"),
        ("machine", f"{os.cpu_count()} CPUs, load {result['machine']['load_average_1m']}, daemon threads {args.threads}"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print(f"wrote {out}")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
