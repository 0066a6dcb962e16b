"""`streamer demo` end to end on the fast dataset: embedded broker, daemon, summary and plot."""
import subprocess
import sys

import pytest

pytestmark = pytest.mark.kafka


def test_demo_prints_summary_and_writes_plot(tmp_path):
    """The demo runs to the end, answers every request and leaves a readable summary and a PNG."""
    out = subprocess.run([sys.executable, "-m", "streamer", "demo", "--dataset", "digits", "--requests", "8",
                          "--workdir", str(tmp_path / "demo")], cwd=tmp_path, capture_output=True, text=True,
                         timeout=900, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "[5/5] done" in out.stdout
    assert "| v000001 | v000000 | 8 |" in out.stdout
    assert "receipts by outcome: duplicate 1, forgotten" in out.stdout and "rejected 2" in out.stdout
    (line,) = [ln for ln in out.stdout.splitlines() if ln.startswith("model: ")]
    assert "/model.pt (state_dict): net = streamer.engine.models.digits_cnn(); net.load_state_dict(" in line
    recorded = line.split("(the daemon recorded ")[1].rstrip(")")
    assert f"its audit accuracy is {float(recorded):.3f}" in line  # the user's load gives the daemon's model
    png = tmp_path / "demo" / "accuracy_per_version.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "artifacts" / "digits.pt").is_file()  # trained on first use
