"""The demo's run directory: its only uri root holds data alone, and its children get only the
environment they need. (The whole demo runs in test_demo.py; these are the fast checks.)"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from streamer.cli.demo import write_config
from streamer.config import load_config
from streamer.environ import BASE, PYTHON, child_env
from streamer.intake import InvalidEvent, SampleContext
from streamer.intake.samples import decode_sample


def test_a_producer_reaches_only_the_data_directory(tmp_path: Path) -> None:
    """uri samples may name files in <workdir>/data only: the KEK, the checkpoints and a link out of
    data/ into them are refused; a file in data/ is read."""
    cfg = load_config(write_config(tmp_path, "digits", tmp_path / "w.pt", "127.0.0.1:9", 0))
    assert cfg.data.uri_roots == ((tmp_path / "data").resolve(),)
    for secret in (cfg.privacy.kek_file, cfg.checkpoints.dir):
        assert not Path(secret).resolve().is_relative_to(cfg.data.uri_roots[0])
    ctx = SampleContext(num_classes=10, input_shape=cfg.model.input_shape, uri_roots=cfg.data.uri_roots)
    (tmp_path / "checkpoints" / "v000000").mkdir(parents=True)
    torch.save(torch.zeros(1, 8, 8), tmp_path / "checkpoints" / "v000000" / "model.pt")
    os.symlink(tmp_path / "checkpoints" / "v000000" / "model.pt", tmp_path / "data" / "link.pt")
    for path in (tmp_path / "checkpoints" / "v000000" / "model.pt", tmp_path / "data" / "link.pt"):
        with pytest.raises(InvalidEvent, match="outside the allowed roots"):
            decode_sample({"uri": path.as_uri()}, ctx)
    np.save(tmp_path / "data" / "ok.npy", np.zeros((1, 8, 8), np.float32))
    assert decode_sample({"uri": (tmp_path / "data" / "ok.npy").as_uri()}, ctx).shape == (1, 8, 8)


def test_children_get_only_the_environment_they_need() -> None:
    """The broker's and the daemon's environments keep what runs them and drop everything else."""
    parent = {"PATH": "/bin", "HOME": "/root", "LC_ALL": "C", "PYTHONPATH": "/src", "OMP_NUM_THREADS": "1",
              "STREAMER_KEK": "secret", "AWS_SECRET_ACCESS_KEY": "secret", "KAFKA_SASL_PASSWORD": "secret"}
    assert child_env(BASE, parent, NO_COLOR="1") == {"PATH": "/bin", "HOME": "/root", "LC_ALL": "C", "NO_COLOR": "1"}
    assert set(child_env((*BASE, *PYTHON), parent)) == {"PATH", "HOME", "LC_ALL", "PYTHONPATH", "OMP_NUM_THREADS"}
