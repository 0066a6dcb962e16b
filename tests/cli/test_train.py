"""`streamer train`: cached by recipe, canaries only where the benchmark defines them."""
from __future__ import annotations

import json

import pytest
import structlog

from streamer.cli.main import main


@pytest.fixture(autouse=True)
def _restore_logging():
    """main() points structlog at this test's captured stdout, which closes after it."""
    yield
    structlog.reset_defaults()


def test_train_is_cached_and_retrains_on_request(tmp_path, monkeypatch, capsys):
    import streamer.engine.train as train

    monkeypatch.setitem(train._EPOCHS, "digits", 1)
    out = tmp_path / "digits.pt"
    assert main(["train", "digits", "--out", str(out)]) == 0
    assert "saved" in capsys.readouterr().out and out.is_file()
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["recipe"]["dataset"] == "digits" and 0 <= report["audit_acc"] <= 1
    assert main(["train", "digits", "--out", str(out)]) == 0
    assert "cached" in capsys.readouterr().out
    assert main(["train", "digits", "--out", str(out), "--retrain"]) == 0
    assert "saved" in capsys.readouterr().out


def test_canaries_for_a_dataset_without_them_is_a_usage_error(tmp_path, capsys):
    assert main(["train", "digits", "--out", str(tmp_path / "d.pt"), "--canaries"]) == 2
    err = capsys.readouterr().err
    assert "no benchmark canaries for digits" in err and not (tmp_path / "d.pt").exists()
