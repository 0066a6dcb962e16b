"""The engine and the model formats on the device the tests are pointed at (issue 24).

`STREAMER_TEST_DEVICE` (default cpu) names it; `./run gpu-check` runs this module (and the
prefix tests) with `cuda`. Asking for cuda where torch sees no GPU fails: a check that silently
ran on the CPU would say nothing about the GPU.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from engine_fixtures import tiny_data, tiny_model
from streamer.engine import Fragment, Unlearner, load_user_model_bytes, method_config, save_user_model
from streamer.engine.models import Normalized
from streamer.engine.prefix import plan_split

DEVICE = torch.device(os.environ.get("STREAMER_TEST_DEVICE", "cpu"))


def test_the_device_asked_for_is_there():
    assert DEVICE.type == "cpu" or (DEVICE.type == "cuda" and torch.cuda.is_available()), \
        f"STREAMER_TEST_DEVICE={DEVICE} but torch {torch.__version__} sees no such device"


def _resnet18() -> Normalized:
    from torchvision.models import resnet18
    torch.manual_seed(0)
    return Normalized(resnet18(num_classes=10), (0.5,) * 3, (0.25,) * 3).to(DEVICE).eval()


@pytest.mark.parametrize("which", ["tiny", "resnet18-32"])
def test_a_fragment_reaches_its_goal_on_the_device(which: str):
    """Misclassify a fragment of 4 with the default method: goal reached, every instance
    misclassified, the weights still on the device and finite."""
    if which == "tiny":
        model = tiny_model().to(DEVICE)
        x, _ = tiny_data(60)
        cfg = method_config("default", n_adv=2, pgd_steps=5, max_steps=300, max_seconds=1e9)
    else:
        model = _resnet18()
        x = torch.rand(4, 3, 32, 32)
        cfg = method_config("default", max_steps=300, max_seconds=1e9)
    x = x.to(DEVICE)
    with torch.no_grad():
        y = model(x).argmax(1)
    x, y = x[:4], y[:4]
    out = Unlearner(model, cfg, 3 if which == "tiny" else 10).unlearn(Fragment(x, y, torch.full_like(y, -1)))
    assert out.goal_reached and out.fragment_met == [True] * 4
    with torch.no_grad():
        assert (model(x).argmax(1) != y).all()
    assert all(p.device.type == DEVICE.type and torch.isfinite(p).all() for p in model.parameters())


def test_the_traced_split_computes_the_model_on_the_device():
    model = _resnet18()
    x = torch.rand(6, 3, 32, 32, device=DEVICE)
    split, why = plan_split(model, [n for n, _ in model.net.named_parameters() if n.startswith(("layer4.1", "fc"))],
                            x[:2])
    assert split is not None, why
    with torch.no_grad():
        assert torch.allclose(split.suffix(split.features(x)), model(x), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("fmt", ["state_dict", "torchscript", "export"])
def test_a_model_file_round_trips_from_the_device(fmt: str):
    """A version written from device weights loads back (on the CPU, as serving reads it) with the
    same logits."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(64, 3)).to(DEVICE).eval()
    data = save_user_model(net, fmt, (1, 4, 4))
    template = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    loaded = load_user_model_bytes(data, fmt, template).cpu().eval()
    x = torch.rand(5, 1, 4, 4)
    with torch.no_grad():
        assert torch.allclose(loaded(x), net.cpu()(x), atol=1e-5)
