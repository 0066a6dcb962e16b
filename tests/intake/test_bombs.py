"""Memory bombs through samples: no record takes more memory than a stated multiple of
max_payload_bytes (README "Security": decoding one record takes less than BOUND_PAYLOADS x max_payload_bytes,
plus a fixed multiple of the model input, which is tiny here).

Each bomb is a file or an event a producer controls, small enough to pass the payload limit, that
expands when decoded (a deflated tensor archive ~1000:1, a stride-0 view, a legacy torch file
whose pickle sizes its storages, PNG text chunks, an .npy header or PNG size that claims more than
the file holds, JSON values ~20 times their bytes). A fresh process decodes them one after another and reports the growth of its peak resident
memory (reset before each, Linux /proc/self/clear_refs): the growth must stay under the bound, and each must be rejected (but the PNG, whose
pixels are a valid image once its text is dropped unread).
"""
from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

MAX_PAYLOAD = 256 * 1024
BOUND_PAYLOADS = 4  # README "Security": decoding one record grows the peak by < 4 x max_payload_bytes
EXPANDED = 64 * 2**20  # what each bomb would take if decoded naively: 256 x the payload limit
SHAPE = (1, 8, 8)

CHILD = r"""
import json, re, sys
from pathlib import Path
from streamer.intake import InvalidEvent, SampleContext, parse_event

root, max_payload = Path(sys.argv[1]), int(sys.argv[2])
ctx = SampleContext(num_classes=10, input_shape=(1, 8, 8), uri_roots=(root,), max_payload_bytes=max_payload)
cases = json.loads(Path(sys.argv[3]).read_text())

def reset_peak():  # Linux: "5" resets the peak resident set size (proc(5), clear_refs)
    Path("/proc/self/clear_refs").write_text("5")

def peak():
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

for value in cases["warm"]:  # every decoder once: imports and first allocations are not the bomb's
    parse_event(value.encode(), ctx)
for name, value in cases["bombs"]:
    reset_peak()
    before = peak()
    try:
        parse_event(value.encode(), ctx)
        outcome = "accepted"
    except InvalidEvent as err:
        outcome = err.reason
    print(json.dumps({"bomb": name, "growth": peak() - before, "outcome": outcome}), flush=True)
"""


def _event(sample: dict, extra: dict | None = None) -> str:
    return json.dumps({"schema": 1, "request_id": "bomb", "label": 0, "sample": sample, **(extra or {})},
                      separators=(",", ":"))


def _deflated(archive: bytes) -> bytes:
    """The same torch.save archive with every entry deflated (torch.save stores them)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename), compress_type=zipfile.ZIP_DEFLATED)
    return out.getvalue()


def _png_with_text(chunks: int, each: int) -> bytes:
    """An 8x8 grey PNG carrying `chunks` zTXt chunks that each inflate to `each` bytes."""
    out = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(out, format="PNG")
    png = out.getvalue()
    text = b"comment\x00\x00" + zlib.compress(bytes(each), 9)
    chunk = struct.pack(">I", len(text)) + b"zTXt" + text + struct.pack(">I", zlib.crc32(b"zTXt" + text))
    return png[:33] + chunk * chunks + png[33:]  # after IHDR (8 + 25 bytes), before IDAT


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """A .npy header claiming `shape` float32, and no data."""
    header = repr({"descr": "<f4", "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bombs")
    uri = lambda name: {"uri": (root / name).as_uri()}  # noqa: E731
    buffer = io.BytesIO()
    torch.save(torch.zeros(EXPANDED // 4), buffer)
    (root / "deflated.pt").write_bytes(_deflated(buffer.getvalue()))
    buffer = io.BytesIO()
    torch.save(torch.zeros(1).expand(EXPANDED // 4), buffer)  # one float, viewed EXPANDED // 4 times
    (root / "stride0.pt").write_bytes(buffer.getvalue())
    buffer = io.BytesIO()
    torch.save(torch.zeros(SHAPE), buffer, _use_new_zipfile_serialization=False)  # sizes from its pickle
    (root / "legacy.pt").write_bytes(buffer.getvalue())
    (root / "text.png").write_bytes(_png_with_text(EXPANDED // 2**20, 2**20))
    (root / "header.npy").write_bytes(_npy_header((EXPANDED // 4,)))
    big = io.BytesIO()
    Image.new("L", (12_000, 12_000)).save(big, format="PNG", optimize=True)  # 144 MB of pixels in ~140 KB
    (root / "wide.png").write_bytes(big.getvalue())
    warm = io.BytesIO()
    torch.save(torch.zeros(SHAPE), warm)
    (root / "ok.pt").write_bytes(warm.getvalue())
    np.save(root / "ok.npy", np.zeros(SHAPE, np.float32))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "ok.png")
    objects = "[" + ",".join(["{}"] * (MAX_PAYLOAD // 3 - 100)) + "]"  # each "{}," a dict of ~64 bytes
    strings = "[" + ",".join(['"ab"'] * (MAX_PAYLOAD // 5 - 100)) + "]"  # each '"ab",' a str of ~51 bytes
    bombs = [("deflated tensor archive", _event(uri("deflated.pt"))),
             ("stride-0 tensor view", _event(uri("stride0.pt"))),
             ("legacy torch file", _event(uri("legacy.pt"))),
             ("PNG text chunks", _event(uri("text.png"))),
             ("npy header", _event(uri("header.npy"))),
             ("PNG dimensions", _event(uri("wide.png"))),
             ("JSON objects", _event(uri("ok.png"), {"x": json.loads(objects)})),
             ("JSON strings", _event(uri("ok.png"), {"x": json.loads(strings)}))]
    for name, value in bombs:
        assert len(value) <= MAX_PAYLOAD, (name, len(value))
    for path in root.iterdir():
        assert path.stat().st_size <= MAX_PAYLOAD, path
    spec = root.parent / "cases.json"
    spec.write_text(json.dumps({"warm": [_event(uri(n)) for n in ("ok.pt", "ok.npy", "ok.png")], "bombs": bombs}))
    return root, spec


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures the peak RSS through Linux /proc")
def test_no_sample_bomb_expands_past_the_bound(cases: tuple[Path, Path]) -> None:
    """Every bomb is rejected, and decoding it grows the process's peak memory by less than
    BOUND_PAYLOADS x max_payload_bytes (what each would take decoded naively: EXPANDED)."""
    root, spec = cases
    out = subprocess.run([sys.executable, "-c", CHILD, str(root), str(MAX_PAYLOAD), str(spec)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["bomb"] for r in results] == [name for name, _ in json.loads(spec.read_text())["bombs"]]
    print(*results, sep="\n")
    for r in results:
        assert r["outcome"] != "accepted" or r["bomb"] == "PNG text chunks", r  # its pixels are a valid image
        assert r["growth"] < BOUND_PAYLOADS * MAX_PAYLOAD, r
