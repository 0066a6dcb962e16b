"""Canaries: training instances a model can only fit by memorising them, planted in the
reference training so that forgetting can be tested where it matters.

Two kinds (both seeded, reproducible from `CanarySpec`):
- interclass confusion (Goel et al., "Towards Adversarial Evaluation of Machine Unlearning",
  2022/2024): `interclass` images of class `source` labelled `sink`;
- random label: `random_label` images, each labelled with a uniformly drawn other class.
Each canary is seen `repeat` times per epoch (Carlini et al., "The Secret Sharer", USENIX
Security 2019, insert canaries repeatedly so a model memorises them in few epochs).

A model that never saw a canary predicts (mostly) its true class; one that memorised it predicts
its canary label. The true label is kept here for the benchmark only: streamer itself never
knows it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .data import Dataset

__all__ = ["BENCHMARK_CANARIES", "CanarySpec", "Canaries", "plant_canaries", "training_set"]


@dataclass(frozen=True)
class CanarySpec:
    interclass: int = 0  # images of class `source` relabelled `sink`
    source: int = 6
    sink: int = 0
    random_label: int = 0  # images relabelled to a random other class
    repeat: int = 1  # times each canary is seen per epoch
    seed: int = 0

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Canaries:
    """Where the canaries are in the train split and what they are labelled.

    index (C,) int64 into the train split; true_y (C,) the dataset's labels; canary_y (C,) the
    labels trained on; kind: "interclass" or "random_label" per canary, in that order."""

    spec: CanarySpec
    index: torch.Tensor
    true_y: torch.Tensor
    canary_y: torch.Tensor
    kind: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.index)

    def to_json(self) -> dict:
        return {"spec": self.spec.to_json(), "index": self.index.tolist(), "true_y": self.true_y.tolist(),
                "canary_y": self.canary_y.tolist(), "kind": list(self.kind)}


def plant_canaries(train: Dataset, spec: CanarySpec, num_classes: int = 10) -> Canaries:
    """Choose the canaries in `train` (N images) by `spec.seed`. Raises ValueError when the
    source class has fewer than `spec.interclass` images or the spec is out of range."""
    if min(spec.interclass, spec.random_label) < 0 or spec.repeat < 1 or spec.source == spec.sink:
        raise ValueError(f"bad canary spec {spec}: counts >= 0, repeat >= 1, source != sink")
    g = torch.Generator().manual_seed(10_000 + spec.seed)
    of_source = torch.nonzero(train.y == spec.source).flatten()
    if len(of_source) < spec.interclass:
        raise ValueError(f"class {spec.source} has {len(of_source)} training images, {spec.interclass} asked")
    ic = of_source[torch.randperm(len(of_source), generator=g)[: spec.interclass]]
    rest = torch.ones(len(train), dtype=torch.bool)
    rest[ic] = False
    others = torch.nonzero(rest).flatten()
    rl = others[torch.randperm(len(others), generator=g)[: spec.random_label]]
    true_y = torch.cat([train.y[ic], train.y[rl]])
    shift = torch.randint(1, num_classes, (len(rl),), generator=g)
    canary_y = torch.cat([torch.full((len(ic),), spec.sink, dtype=torch.int64), (train.y[rl] + shift) % num_classes])
    return Canaries(spec, torch.cat([ic, rl]), true_y, canary_y,
                    ("interclass",) * len(ic) + ("random_label",) * len(rl))


def training_set(train: Dataset, canaries: Canaries | None = None, exclude: torch.Tensor | None = None) -> Dataset:
    """What a reference model is fitted on: `train` with the canaries' labels, each canary
    repeated `spec.repeat` times, and without the `exclude` indices (a retrained reference:
    the same training without the forget set). Returns a new Dataset; `train` is not changed."""
    y = train.y.clone()
    keep = torch.ones(len(train), dtype=torch.bool)
    if exclude is not None:
        keep[exclude] = False
    extra = torch.zeros(0, dtype=torch.int64)
    if canaries is not None and len(canaries):
        y[canaries.index] = canaries.canary_y
        kept = canaries.index[keep[canaries.index]]
        extra = kept.repeat(canaries.spec.repeat - 1)
    index = torch.cat([torch.nonzero(keep).flatten(), extra])
    return Dataset(train.x[index], y[index])


# The benchmarks' canaries (issue 11): 0.4% of a class confused with a similar one, plus a few
# random labels; repeated 4x per epoch so the reference models memorise them.
BENCHMARK_CANARIES = {
    "fashion": CanarySpec(interclass=24, source=6, sink=0, random_label=8, repeat=4),  # shirt -> T-shirt/top
    "mnist5k": CanarySpec(interclass=16, source=4, sink=9, random_label=8, repeat=4),
}
