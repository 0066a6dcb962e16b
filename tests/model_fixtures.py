"""Small real models shared by the engine and service tests: a BatchNorm CNN (eager, scripted,
exported), torchvision's resnet18, inputs, and one optimizer step of the daemon's kind."""
from __future__ import annotations

import io

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from streamer.engine.formats import load_user_model_bytes

INPUT = (3, 8, 8)
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def small_cnn(num_classes: int = 10, seed: int = 0) -> nn.Module:
    """(B, 3, 8, 8) -> (B, num_classes): Conv-BN-ReLU, pooling, a two-Linear head; eval mode."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(),  # (B, 32)
        nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, num_classes),
    )
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval and train mode differ
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


def resnet18() -> nn.Module:
    """torchvision's resnet18 for 10 classes, random weights, eval mode."""
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def exported_small_cnn(train: bool = False, dynamic: bool = True) -> nn.Module:
    """The small CNN as a user ships it in a .pt2 file, loaded back through formats."""
    net = small_cnn().train(train)
    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(net, (torch.rand(2, *INPUT),), dynamic_shapes=shapes), buffer)
    return load_user_model_bytes(buffer.getvalue(), "export")


def pixels(n: int = 4, shape: tuple[int, ...] = INPUT) -> torch.Tensor:
    """(n, *shape) uniform pixels in [0, 1], the same every call."""
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(1))


def one_step(model: nn.Module, names: list[str] | None = None, lr: float = 0.5) -> None:
    """One SGD step of the daemon's kind: eval mode, only `names` (default all) move; it must
    change the predictions."""
    x = pixels()
    params = dict(model.named_parameters())
    chosen = [params[n] for n in (names or list(params))]
    before = model(x).detach().clone()
    optimizer = torch.optim.SGD(chosen, lr=lr)
    loss = F.cross_entropy(model(x), torch.tensor([1, 2, 3, 4]))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert not torch.equal(model(x).detach(), before), "the step did not change the predictions"
