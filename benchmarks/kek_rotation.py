"""How long a KEK rotation and a KMS-backed vault's start take, per number of live entries.

    python benchmarks/kek_rotation.py [--entries 1000] [--out results/kek_rotation.json]

For N entries of the digits shape (1, 8, 8): `rotate_vault` file -> file, file -> KMS and
KMS -> KMS, and the start-up cost of a KMS KEK (the key check plus every live entry decrypted, as
the daemon's recovery does). The KMS is moto's server on 127.0.0.1 (tests/aws_server.py), so the
KMS numbers are a local HTTP round trip per call, not AWS's latency.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's streamer, the tests' KMS server

from aws_server import TEST_ENV, AwsServer  # noqa: E402
from streamer.config import KmsKeyConfig  # noqa: E402
from streamer.state.kek import LocalKEK  # noqa: E402
from streamer.state.kms import KmsKEK  # noqa: E402
from streamer.state.rotation import rotate_vault  # noqa: E402
from streamer.state.vault import ForgetVault, VaultItem  # noqa: E402


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return round(time.perf_counter() - start, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    os.environ.update(TEST_ENV)
    work = Path(tempfile.mkdtemp(prefix="kek-rotation-"))
    server = AwsServer(work / "moto.log")
    server.start()
    try:
        kms = [KmsKEK(KmsKeyConfig(server.create_kms_key(), None, server.endpoint_url)) for _ in range(2)]
        g = torch.Generator().manual_seed(0)
        items = [VaultItem(f"r{i}", torch.rand(1, 8, 8, generator=g), i % 10, -1) for i in range(args.entries)]
        a, b = LocalKEK(os.urandom(32)), LocalKEK(os.urandom(32))
        root, ledger = work / "vault", work / "ledger.sqlite3"
        result = {"entries": args.entries, "host": platform.node(), "cpus": os.cpu_count(),
                  "load_average_1min": round(os.getloadavg()[0], 2),
                  "put_file_s": _timed(lambda: ForgetVault.open(root, a).put(items))}
        result["rotate_file_to_file_s"] = _timed(lambda: rotate_vault(root, a, b, ledger))
        result["rotate_file_to_kms_s"] = _timed(lambda: rotate_vault(root, b, kms[0], ledger))
        ids = [item.request_id for item in items]
        result["start_kms_open_and_decrypt_all_s"] = _timed(lambda: ForgetVault.open(root, kms[0]).get(ids))
        result["rotate_kms_to_kms_s"] = _timed(lambda: rotate_vault(root, kms[0], kms[1], ledger))
    finally:
        server.stop()
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
