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

When the label `y` (the one the model was trained on) is given, a second stage handles the
instances whose vote is not their label -- those the teacher knows only by heart. Strong warps
leave the memorised region but also blur the instance (a Fashion shirt drifts to coat or dress);
so their class is the teacher's best class other than `y`, by mean probabilities over 4x as many
warps at half strength, close to the instance. Measured on the Fashion ResNet's 32 canaries
(24 shirts trained as T-shirts, 8 random labels), 256 warps, vote seeds 0-5: true class
0.72-0.78 (mean 0.75; the one-stage vote 0.59-0.66; with 256 warps in the second stage
0.69-0.78); the retrained references of benchmark seeds 0-2: 0.78 / 0.75 / 0.75. MNIST-5k's
canaries (seed 0) and the typical instances of both: unchanged.

With a retain buffer (held-out images), a memorised instance gets two more targets
(`FeatureGoal`): its penultimate features near its class's prototype, and its confidence in the
label it was trained on (`label_confidence`, LiRA's statistic) no higher than the original
model's median on held-out images of its class (`confidence_caps`) -- the class alone leaves the
old label far more probable than a model that never saw the instance makes it, which is what a
per-example attacker reads. Measured (benchmarks/per_example_mia.py --quick, MNIST-5k, 16
canaries, 4 shadows per side): mean phi of the canary label -1.37 -> -8.67 (never-trained
models: -9.87), U-LiRA AUC 0.937 -> 0.728.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import Interrupted
from .augment import random_affine

__all__ = ["UNSEEN", "FeatureGoal", "class_prototypes", "label_confidence", "last_linear", "unseen_classes"]

UNSEEN = -2  # Fragment.target value of an `unseen` request, before `unseen_classes` resolves it


@torch.no_grad()
def unseen_classes(teacher: nn.Module, x: torch.Tensor, seed: int = 0, warps: int = 256,
                   batch_size: int = 1024, should_stop: Callable[[], bool] | None = None,
                   y: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) int64: argmax over classes of the mean softmax of `teacher` on `warps` random affine
    warps of each x (N, C, H, W) in [0, 1] (`augment.random_affine`, its default ranges). With
    `y` (N,), the trained labels: where that vote is not y, the argmax over classes other than y
    of the mean softmax on 4 x `warps` warps at half strength (see the module's docstring). Each
    instance's warps are drawn from a generator seeded by `seed` and its pixels, so an image gets
    the same class whatever else is in its fragment. The teacher runs in eval mode on batches of
    about `batch_size` warps. Raises Interrupted when `should_stop()` turns true between batches."""
    if len(x) == 0:
        return torch.zeros(0, dtype=torch.int64, device=x.device)
    was_training = teacher.training
    teacher.eval()
    try:
        votes = _mean_probs(teacher, x, seed, warps, batch_size, should_stop, 1.0).argmax(1)
        if y is None:
            return votes
        y = y.to(votes.device)
        off = votes != y
        if bool(off.any()):
            near = _mean_probs(teacher, x[off], seed, 4 * warps, batch_size, should_stop, 0.5)
            near[torch.arange(len(near)), y[off].to(near.device)] = -1.0  # the trained label is excluded
            votes = votes.masked_scatter(off, near.argmax(1).to(votes.device))
        return votes
    finally:
        teacher.train(was_training)


def _mean_probs(teacher: nn.Module, x: torch.Tensor, seed: int, warps: int, batch_size: int,
                should_stop: Callable[[], bool] | None, strength: float) -> torch.Tensor:
    """(N, classes) the teacher's mean softmax over `warps` warps of each x, `strength` x the
    default ranges of `random_affine`."""
    ranges = dict(rotate=0.26 * strength, scale=0.15 * strength, translate=0.1 * strength)
    out = []
    for chunk in x.split(max(1, batch_size // warps)):
        if should_stop is not None and should_stop():
            raise Interrupted("the unseen vote was cancelled")
        copies = torch.cat([random_affine(xi[None].expand(warps, *xi.shape), _generator(xi, seed), **ranges)
                            for xi in chunk])
        probs = F.softmax(teacher(copies).float(), 1)
        out.append(probs.view(len(chunk), warps, -1).mean(1))
    return torch.cat(out)


def _generator(image: torch.Tensor, seed: int) -> torch.Generator:
    """A CPU generator seeded by `seed` and a digest of the image's float32 pixels."""
    digest = hashlib.blake2b(image.detach().float().cpu().contiguous().numpy().tobytes(), digest_size=8).digest()
    return torch.Generator().manual_seed((int.from_bytes(digest, "big") ^ seed) & (2**63 - 1))


def last_linear(model: nn.Module) -> nn.Linear | None:
    """The last eager nn.Linear in module order (the classifier head of the usual CNN), or None
    (TorchScript and exported programs, or no Linear)."""
    found = [m for m in model.modules() if isinstance(m, nn.Linear) and not isinstance(m, torch.jit.ScriptModule)]
    return found[-1] if found else None


@torch.no_grad()
def class_prototypes(teacher: nn.Module, data, num_classes: int, batch_size: int = 256) -> torch.Tensor:
    """(num_classes, D) float32: the mean of `teacher`'s penultimate features (the input of its last
    nn.Linear, flattened) over `data`'s images (a Dataset: x (N, C, H, W) in [0, 1], y (N,)) of each
    class, in eval mode; NaN rows for classes `data` does not hold. Where a model that never saw an
    instance puts unseen images of a class (the class means that a linear probe separates; Papyan
    et al., PNAS 2020, on their alignment with the classifier). Raises ValueError without an eager
    nn.Linear."""
    head = last_linear(teacher)
    if head is None:
        raise ValueError("class_prototypes needs an eager nn.Linear head to read penultimate features from")
    caught: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, inputs, _out: caught.append(inputs[0].flatten(1).float()))
    was_training = teacher.training
    teacher.eval()
    try:
        for chunk in data.x.split(batch_size):
            teacher(chunk)
    finally:
        handle.remove()
        teacher.train(was_training)
    features, y = torch.cat(caught), data.y.to(caught[0].device)
    out = torch.full((num_classes, features.shape[1]), float("nan"), device=features.device)
    for c in y.unique().tolist():
        if 0 <= c < num_classes:
            out[c] = features[y == c].mean(0)
    return out


def label_confidence(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """(N,) LiRA's logit-scaled confidence phi = log(p_y / (1 - p_y)) = z_y - logsumexp_{j != y} z_j
    of logits (N, C) on label (N,) (Carlini et al., S&P 2022, Eq. 4; the statistic U-LiRA fits),
    computed from logits so that it stays finite where p_y rounds to 1. Differentiable."""
    own = logits.gather(1, label[:, None]).squeeze(1)
    return own - logits.scatter(1, label[:, None], float("-inf")).logsumexp(1)


@torch.no_grad()
def confidence_caps(teacher: nn.Module, data, classes: torch.Tensor, labels: torch.Tensor, x: torch.Tensor | None = None,
                    neighbours: int = 0, quantile: float = 0.5, batch_size: int = 256) -> torch.Tensor:
    """(m,) float32: for each pair (classes[i], labels[i]), the `quantile` of the teacher's
    `label_confidence` on labels[i] over `data`'s images of class classes[i] (held-out images: how
    sure a model that never saw an instance of that class is of that label) -- with `x` (m, C, H,
    W) and `neighbours` > 0, over the `neighbours` of them nearest to x[i] in pixel L2 (how sure it
    is of an image that looks like x[i]); NaN where `data` holds no image of the class. Eval mode,
    batches of `batch_size`."""
    was_training = teacher.training
    teacher.eval()
    try:
        logits = torch.cat([teacher(chunk).float() for chunk in data.x.split(batch_size)])
    finally:
        teacher.train(was_training)
    y = data.y.to(logits.device)
    out = torch.full((len(classes),), float("nan"), device=logits.device)
    for i, (c, label) in enumerate(zip(classes.tolist(), labels.tolist())):
        rows = torch.nonzero(y == c).flatten()
        if len(rows) == 0:
            continue
        if x is not None and 0 < neighbours < len(rows):
            distance = (data.x[rows].flatten(1) - x[i].flatten()[None].to(data.x.device)).pow(2).sum(1)
            rows = rows[distance.topk(neighbours, largest=False).indices.to(rows.device)]
        phi = label_confidence(logits[rows], torch.full((len(rows),), label, device=logits.device))
        out[i] = phi.quantile(quantile)
    return out


class FeatureGoal:
    """The unseen goal's parts beyond the class, for memorised instances (their class is not their
    label), with a retain buffer of held-out images:
    - features: their penultimate features (the input of the last nn.Linear) must come within
      `tol` (relative L2) of their class's prototype (`class_prototypes` of the teacher on the buffer);
    - confidence: their `label_confidence` on the label they were trained with must fall to `caps`,
      the teacher's median on the buffer's images of their class (`confidence_caps`): no surer of
      the memorised label than a model that never saw them, which is what a per-example membership
      attacker (U-LiRA, Hayes et al. 2024) reads.

    Use as a context manager around the step loop: a forward hook catches the features of every
    forward; `check(logits)` after a step's objective forward gives (met, weighted loss term)."""

    def __init__(self, head: nn.Linear, rows: torch.Tensor, targets: torch.Tensor, tol: float, weight: float,
                 labels: torch.Tensor | None = None, caps: torch.Tensor | None = None, confidence_weight: float = 0.0):
        self.head, self.rows, self.targets, self.tol, self.weight = head, rows, targets, tol, weight
        self.labels, self.caps, self.confidence_weight = labels, caps, confidence_weight
        self._caught: list[torch.Tensor] = []
        self._handle: Any = None
        self.gaps = torch.full((len(rows),), float("inf"))  # (m,) relative L2 distances at the last check
        self.excess = torch.full((len(rows),), float("inf"))  # (m,) label confidence above its cap at the last check

    @staticmethod
    def build(net: nn.Module, teacher: nn.Module, buffer: Any, num_classes: int, y: torch.Tensor,
              target: torch.Tensor, unseen: torch.Tensor, tol: float, weight: float,
              confidence_weight: float = 0.0, x: torch.Tensor | None = None,
              neighbours: int = 0, quantile: float = 0.5) -> FeatureGoal | None:
        """The goal of the objective's rows (y, target, unseen: (n,); x: their pixels, for
        `neighbours`) that are resolved unseen goals other than their label, for the classes the
        buffer holds. None when off (`weight` 0), without a buffer or an eager nn.Linear head, or
        when no row qualifies. `confidence_weight` 0: no confidence part. (Typical instances get
        none: capped at their neighbours' median, they stood out more to U-LiRA, AUC 0.60 -> 0.66
        on the --quick plan of benchmarks/per_example_mia.py.)"""
        head = last_linear(net)
        if weight <= 0 or buffer is None or head is None:
            return None
        rows = torch.nonzero(unseen & (target >= 0) & (target != y)).flatten()
        if len(rows) == 0:
            return None
        targets = class_prototypes(teacher, buffer, num_classes)[target[rows]]
        keep = torch.isfinite(targets).all(1)
        if not bool(keep.any()):
            return None
        rows, targets = rows[keep], targets[keep]
        if confidence_weight <= 0:
            return FeatureGoal(head, rows, targets, tol, weight)
        caps = confidence_caps(teacher, buffer, target[rows], y[rows], None if x is None else x[rows], neighbours,
                               quantile)
        return FeatureGoal(head, rows, targets, tol, weight, y[rows], caps, confidence_weight)

    def __enter__(self) -> FeatureGoal:
        self._handle = self.head.register_forward_hook(lambda _m, i, _o: self._caught.append(i[0].flatten(1)))
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    def clear(self) -> None:
        """Forget the features caught so far (call before each step's forwards)."""
        self._caught.clear()

    def check(self, logits: torch.Tensor | None = None) -> tuple[bool, torch.Tensor]:
        """(every row within tol and under its cap, the weighted loss: weight x mean squared relative
        L2 distance + confidence_weight x mean relu(confidence - cap)), from the first forward caught
        since `clear()` (the objective's) and its logits (n, C)."""
        features = self._caught[0][self.rows]  # (m, D)
        gap = (features - self.targets).pow(2).sum(1) / self.targets.pow(2).sum(1).clamp_min(1e-12)
        self.gaps = gap.detach().sqrt().cpu()
        met, loss = bool((self.gaps <= self.tol).all()), self.weight * gap.mean()
        if self.caps is not None and logits is not None:
            excess = label_confidence(logits[self.rows].float(), self.labels) - self.caps  # (m,)
            self.excess = excess.detach().cpu()
            met = met and bool((self.excess <= 0).all())
            loss = loss + self.confidence_weight * F.relu(excess).mean()
        return met, loss

    def row_gaps(self, n: int) -> list[float | None]:
        """Per objective row (n of them), its relative L2 distance to its prototype at the last
        check; None for a row without a feature goal."""
        return self._per_row(n, self.gaps)

    def row_excess(self, n: int) -> list[float | None]:
        """Per objective row (n of them), its label confidence above its cap at the last check
        (nats; <= 0: met); None for a row without a confidence part."""
        return self._per_row(n, self.excess) if self.caps is not None else [None] * n

    def unmet(self) -> torch.Tensor:
        """(m,) bool: the rows off their prototype or above their cap at the last check."""
        return (self.gaps > self.tol) | ((self.excess > 0) if self.caps is not None else False)

    def _per_row(self, n: int, values: torch.Tensor) -> list[float | None]:
        out: list[float | None] = [None] * n
        for row, value in zip(self.rows.tolist(), values.tolist()):
            out[row] = value
        return out
