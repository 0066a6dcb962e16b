"""Train a reference classifier on an offline dataset's train split (seconds to a minute on CPU)."""
from __future__ import annotations

import time
from pathlib import Path

import structlog
import torch
import torch.nn.functional as F
from torch import nn

from .data import Dataset, load_splits
from .evaluate import accuracy
from .models import REFERENCE, Normalized

log = structlog.get_logger()

_EPOCHS = {"digits": 40, "mnist5k": 15}


def fit(model: nn.Module, data: Dataset, epochs: int, seed: int = 0, lr: float = 1e-3, batch_size: int = 64) -> nn.Module:
    """Adam + cross-entropy on (x, y); logs one line per few epochs. Returns the model in eval mode."""
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    x, y = data.x.to(device), data.y.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(y), generator=g).to(device)
        total = 0.0
        for i in range(0, len(y), batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        if epoch % 5 == 4 or epoch == epochs - 1:
            log.info("train_epoch", epoch=epoch + 1, epochs=epochs, loss=round(total / len(y), 4))
    return model.eval()


def reference_model(dataset: str) -> Normalized:
    """The dataset's reference CNN, untrained, in the wrapper (pixels in [0, 1], no normalisation)."""
    return Normalized(REFERENCE[dataset](), (0.0,), (1.0,))


def train_reference(dataset: str, out: str | Path, seed: int = 0, device: str = "cpu") -> dict:
    """Train the dataset's reference CNN on its train split and save the state_dict to `out`."""
    splits = load_splits(dataset)
    torch.manual_seed(seed)
    model = reference_model(dataset).to(device)
    start = time.perf_counter()
    fit(model, splits.train, _EPOCHS[dataset], seed=seed)
    report = {
        "dataset": dataset,
        "train_acc": accuracy(model, splits.train.x, splits.train.y),
        "audit_acc": accuracy(model, splits.audit.x, splits.audit.y),
        "seconds": round(time.perf_counter() - start, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.cpu().state_dict(), out)
    log.info("reference_model_saved", path=str(out), **report)
    return report
