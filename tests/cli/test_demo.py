"""`streamer demo` end to end on the fast dataset: embedded broker, vault, daemon, summary, erasure report, plot."""
import base64
import json
import os
import stat
import struct
import subprocess
import sys

import pytest

from streamer.cli.demo import _plan
from streamer.config import load_config

pytestmark = pytest.mark.kafka


def _secrets(value: bytes) -> list[bytes]:
    """The image an event carries, as it could sit on disk: its base64 text, float32 bytes and uint8 bytes."""
    tensor = json.loads(value)["sample"]["tensor"]
    raw = base64.b64decode(tensor["data_b64"])
    floats = [raw[i:i + 4] for i in range(0, len(raw), 4)]
    uint8 = bytes(round(255 * min(max(struct.unpack("<f", f)[0], 0.0), 1.0)) for f in floats)
    return [tensor["data_b64"].encode(), raw, uint8]


def _chunks(secret: bytes, width: int, unit: int, zero: bytes, least: int) -> list[bytes]:
    """`width`-byte pieces of a secret with at least `least` non-zero `unit`-byte elements: runs of black
    pixels are everywhere on disk, strokes are not."""
    rows = [secret[i:i + width] for i in range(0, len(secret) - width + 1, width)]
    return [r for r in rows if sum(r[j:j + unit] != zero for j in range(0, width, unit)) >= least]


def test_demo_prints_summary_and_writes_plot(tmp_path):
    """The demo runs to the end, answers every request, prints the erasure report with every request's window,
    writes its KEK privately, and leaves no plaintext deleted image in any file it wrote."""
    workdir = tmp_path / "demo"
    out = subprocess.run([sys.executable, "-m", "streamer", "demo", "--dataset", "digits", "--requests", "8",
                          "--workdir", str(workdir)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "[6/6] done" in out.stdout
    assert "| v000001 | v000000 | 8 |" in out.stdout
    assert "[5/6] retraining without the 8 forgotten instances" in out.stdout  # the other end of the bridge
    excluded = json.loads((workdir / "excluded.json").read_text())
    assert len(excluded["requests"]) == 8 and all(r["sample"] is None for r in excluded["requests"])  # inline images
    from streamer.state import CheckpointStore
    store = CheckpointStore(workdir / "checkpoints")
    (rebased,) = [store.manifest(v) for v in store.versions() if store.manifest(v).base is not None]
    assert store.lineage(store.current_version())[-1].version == rebased.version
    assert "receipts by outcome: duplicate 1, forgotten" in out.stdout and "rejected 2" in out.stdout
    (line,) = [ln for ln in out.stdout.splitlines() if ln.startswith("model: ")]
    assert "/model.pt (state_dict): net = streamer.engine.models.digits_cnn(); net.load_state_dict(" in line
    recorded = line.split("(the daemon recorded ")[1].rstrip(")")
    assert f"its audit accuracy is {float(recorded):.3f}" in line  # the user's load gives the daemon's model
    png = workdir / "accuracy_per_version.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "artifacts" / "digits.pt").is_file()  # trained on first use

    assert stat.S_IMODE((workdir / "kek.key").stat().st_mode) == 0o600
    report = json.loads((workdir / "erasure_report.json").read_text())
    stream, _ = _plan(load_config(workdir / "config.yaml"), "digits", 8, 0)
    valid = [p for p in stream if p.request_id and p.request_id.startswith("demo-digits-")]
    assert "erasure report (10 requests" in out.stdout  # 8 applied + 2 rejected with a readable id
    status = {r["request_id"]: r["status"] for r in report["requests"]}
    assert all(status[p.request_id] in ("forgotten", "relabelled", "rebased") for p in valid)

    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.parent.name == "data" and p.parent.parent.name == "vault" for p in files)
    for p in {p.request_id: p for p in valid}.values():
        text, raw, uint8 = _secrets(p.value)
        control = b"prefix" + raw + b"|" + uint8 + b"|" + p.value  # how a leak would look: the scan must see it
        for secret, width, unit, zero, least in ((text, 32, 1, b"A", 10), (raw, 32, 4, bytes(4), 4),
                                                 (uint8, 8, 1, b"\0", 4)):
            chunks = [secret, *_chunks(secret, width, unit, zero, least)]  # the whole image, and its strokes
            assert all(c in control for c in chunks), "the scan cannot see the image"
            leaks = [str(f) for f in files if any(c in f.read_bytes() for c in chunks)]
            assert leaks == [], (p.request_id, leaks)
