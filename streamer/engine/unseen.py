"""The `unseen` goal: an instance ends up where a model that never saw it would put it.

A model that memorised an instance (an atypical image, a wrong label) fits it only at that exact
point; warped copies of it (rotated, zoomed, shifted) fall outside the memorised region and are
classified as the rest of the training data teaches. So the teacher's (the original model's)
mean class probabilities over `warps` random affine warps of the instance estimate what a model
trained without it predicts. The goal's class is their argmax; the engine then treats the request
as "relabel to that class", which is usually the request's own label (a typical instance: nothing
to undo but its membership signal) and the true class for a memorised one.

Measured on MNIST-5k with 24 planted canaries (benchmarks/forgetting_attacks.py, seed 0): with
256 warps the vote gives 23 of the 24 canaries their true class (with 64 warps, 20-22 of 24,
depending on the seed: the vote is noisy), and, with 64 warps, the request's label to 97% of 400 typical
training instances (a model retrained without them: 100%).
"""
from __future__ import annotations

import hashlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import Interrupted
from .augment import random_affine

__all__ = ["UNSEEN", "unseen_classes"]

UNSEEN = -2  # Fragment.target value of an `unseen` request, before `unseen_classes` resolves it


@torch.no_grad()
def unseen_classes(teacher: nn.Module, x: torch.Tensor, seed: int = 0, warps: int = 256,
                   batch_size: int = 1024, should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """(N,) int64: argmax over classes of the mean softmax of `teacher` on `warps` random affine
    warps of each x (N, C, H, W) in [0, 1] (`augment.random_affine`, its default ranges). Each
    instance's warps are drawn from a generator seeded by `seed` and its pixels, so an image gets
    the same class whatever else is in its fragment. The teacher runs in eval mode on batches of
    about `batch_size` warps. Raises Interrupted when `should_stop()` turns true between batches."""
    if len(x) == 0:
        return torch.zeros(0, dtype=torch.int64, device=x.device)
    was_training = teacher.training
    teacher.eval()
    try:
        out = []
        for chunk in x.split(max(1, batch_size // warps)):
            if should_stop is not None and should_stop():
                raise Interrupted("the unseen vote was cancelled")
            copies = torch.cat([random_affine(xi[None].expand(warps, *xi.shape), _generator(xi, seed)) for xi in chunk])
            probs = F.softmax(teacher(copies).float(), 1)
            out.append(probs.view(len(chunk), warps, -1).mean(1).argmax(1))
        return torch.cat(out)
    finally:
        teacher.train(was_training)


def _generator(image: torch.Tensor, seed: int) -> torch.Generator:
    """A CPU generator seeded by `seed` and a digest of the image's float32 pixels."""
    digest = hashlib.blake2b(image.detach().float().cpu().contiguous().numpy().tobytes(), digest_size=8).digest()
    return torch.Generator().manual_seed((int.from_bytes(digest, "big") ^ seed) & (2**63 - 1))
