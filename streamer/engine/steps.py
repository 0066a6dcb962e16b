"""What every optimizer step of a fragment feeds the model, built once per fragment.

`StepInputs.build` caches what does not change while a fragment runs: on the fast path, in eval
mode and for a splittable network, the frozen prefix's features (`prefix.py`) of the objective,
the adversarial examples and the retain buffer, so a step runs the trainable suffix only (same
arithmetic: eval mode makes the prefix a fixed function); and a distillation pool with the
teacher's logits. `StepInputs.logits` is one step's forward over its terms' rows.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .augment import random_affine
from .data import Dataset
from .distributed import ALONE, Shard
from .fragment import Fragment
from .methods import UnlearnConfig
from .objectives import goal_gap, goal_met
from .prefix import FrozenPrefix, cpu_channels_last, rows_independent, split_frozen_prefix

__all__ = ["AtRisk", "Logits", "Sampler", "StepInputs", "TERMS", "Term", "distill_inputs"]

TERMS = frozenset({"objective", "adv", "distill", "buffer"})


class Term(NamedTuple):
    """One term's logits in a step, on this rank's rows (distributed.Shard; all rows when alone)."""

    out: torch.Tensor  # (m, classes)
    pick: torch.Tensor | None  # (m,) their rows in the term's source; None: all of them, in order
    n: int  # the term's rows over every rank: the count its mean divides by
    share: float = 1.0  # 1/world where every rank computes the term whole (so the ranks' sum counts it once)


Logits = dict[str, Term]


@dataclass(frozen=True)
class Sampler:
    """Random rows, all drawn from one seeded CPU generator (a fragment is reproducible from cfg.seed)."""

    generator: torch.Generator
    device: torch.device

    def sample(self, n: int, batch: int) -> torch.Tensor:
        """(min(n, batch),) row indices: all of them when n <= batch, else `batch` drawn with replacement."""
        if n <= batch:
            return torch.arange(n, device=self.device)
        return torch.randint(0, n, (batch,), generator=self.generator).to(self.device)

    def draw(self, n: int, count: int) -> torch.Tensor:
        return torch.randint(0, n, (count,), generator=self.generator).to(self.device)


def distill_inputs(x: torch.Tensor, adv_x: torch.Tensor, count: int, warp: str, sampler: Sampler) -> torch.Tensor:
    """(count, C, H, W) distillation inputs made from the forget set `x` (and the retain buffer's
    images when given in `x`): mixup of pairs, random warps and the adversarial examples `adv_x`
    -- never a forget instance as it is, whose teacher output is exactly what must be unlearned.
    A warped instance looks like another example of its class, so the teacher's outputs on them
    hold what the original model knew about the classes being forgotten from. `warp`: `affine`
    (random rotation, scale, translation) or `shift` (a +-2 px roll plus noise)."""
    g, dev = sampler.generator, sampler.device
    pool = torch.cat([x, adv_x]) if len(adv_x) else x
    a = pool[sampler.draw(len(pool), count)]
    b = pool[sampler.draw(len(pool), count)]
    lam = torch.rand(count, 1, 1, 1, generator=g).to(dev)
    mixed = lam * a + (1 - lam) * b
    if warp == "affine":
        warped = random_affine(a, g)
    else:
        shifts = torch.randint(-2, 3, (2,), generator=g).tolist()
        warped = torch.roll(a, shifts=shifts, dims=(2, 3)) + 0.1 * torch.randn(a.shape, generator=g).to(dev)
    adv = adv_x[sampler.draw(len(adv_x), count)] if len(adv_x) else warped
    choice = torch.randint(0, 3, (count, 1, 1, 1), generator=g).to(dev)
    out = torch.where(choice == 0, mixed, torch.where(choice == 1, warped, adv))
    return out.clamp(0.0, 1.0)


@dataclass(frozen=True)
class StepInputs:
    """A fragment's step inputs: `forward` maps them to logits (the trainable suffix on cached
    frozen-prefix features, or the whole model on pixels)."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    split: FrozenPrefix | None
    objective: torch.Tensor  # (n_obj, ...) the fragment then the retained set
    adv: torch.Tensor  # (n_adv, ...)
    adv_y: torch.Tensor  # (n_adv,) their target classes
    adv_pixels: torch.Tensor  # (n_adv, C, H, W) for the distillation inputs made per step
    buffer: torch.Tensor | None  # (n_buffer, ...) when the buffer's cross-entropy term is on
    pool: torch.Tensor | None  # (distill_pool, ...) fast path: distillation inputs
    pool_teacher: torch.Tensor | None  # (distill_pool, classes) the teacher's logits on them
    merge: bool = False  # one forward per step over every term's rows (see `logits`)

    @staticmethod
    def build(cfg: UnlearnConfig, model: nn.Module, teacher: nn.Module, trainable: list[str],
              objective_x: torch.Tensor, adv_x: torch.Tensor, adv_y: torch.Tensor, buffer: Dataset | None,
              sampler: Sampler, shard: Shard = ALONE) -> StepInputs:
        """The inputs of a fragment whose objective is `objective_x` (n_obj, C, H, W). With a
        `shard` of a process group each rank computes its share of the prefix features and the
        pool's teacher logits, and every rank gets them all."""
        example = torch.cat([objective_x[:2], objective_x[:1]])[:2]  # two real rows to trace and check a split on
        split = split_frozen_prefix(model, trainable, example) if cfg.fast_path and not cfg.train_mode else None
        if split is not None:  # fixed while the fragment runs: a channels-last copy computes it on CPU
            split = dataclasses.replace(split, prefix=cpu_channels_last(split.prefix, example))
        encode = (lambda x: x) if split is None else (  # noqa: E731
            _spread(split.features, shard) if rows_independent(split.prefix) else split.features)
        forward = split.suffix if split is not None else model
        buffer_in = encode(buffer.x) if buffer is not None and cfg.buffer_weight > 0 else None
        pool = pool_teacher = None
        if cfg.fast_path and cfg.distill_weight > 0:
            source = objective_x
            if buffer is not None and cfg.distill_buffer:
                source = torch.cat([source, buffer.x])
            # The teacher shares the frozen prefix while it holds the same weights (head-only
            # updates keep it so): its logits are then its suffix on the same features.
            teacher_suffix = _same_prefix_suffix(teacher, split, trainable, example)
            pools, logits = [], []
            for count in _pool_chunks(cfg, source[:1], split.features if split is not None else encode):
                pixels = distill_inputs(source, adv_x, count, cfg.distill_warp, sampler)
                pools.append(encode(pixels))
                with torch.no_grad():
                    logits.append(torch.cat([teacher_suffix(c) for c in pools[-1].split(512)]) if teacher_suffix
                                  is not None else _spread(lambda p: torch.cat([teacher(c) for c in p.split(512)]),
                                                           shard if rows_independent(teacher) else ALONE)(pixels))
                del pixels
            pool, pool_teacher = torch.cat(pools), torch.cat(logits)
        # one forward per step over all terms: fast path, eval mode, rows that do not mix
        merge = cfg.fast_path and not cfg.train_mode and rows_independent(forward)
        return StepInputs(forward, split, encode(objective_x), encode(adv_x) if len(adv_x) else adv_x, adv_y, adv_x,
                          buffer_in, pool, pool_teacher, merge)

    def logits(self, cfg: UnlearnConfig, sampler: Sampler, objective: bool, rows: torch.Tensor | None = None,
               shard: Shard = ALONE, whole: frozenset[str] = frozenset(), others: bool = True) -> Logits:
        """This step's logits per term, with the rows each term drew: objective (`rows` of it, all
        when None; if `objective`),
        adv (a batch of the adversarial examples; all of them with proportional weighting), distill
        (a batch of the fast path's pool), buffer (a batch of the retain buffer). With `merge` one
        forward over all the rows (measured on the MNIST-5k head: 1.7 ms instead of 2.8 ms per
        forward and backward); otherwise one per term. Every rank draws the same rows and runs its
        share of them (`shard.local`), except the terms in `whole`, which every rank runs whole.
        `others` False: the objective's logits alone (the other terms are drawn only when a step follows)."""
        drawn: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {"objective": (self.objective, rows)} if objective else {}
        if others and len(self.adv_y):
            drawn["adv"] = (self.adv, None if cfg.weighting == "proportional"
                            else sampler.sample(len(self.adv_y), cfg.adv_batch))
        if others and cfg.distill_weight > 0 and self.pool is not None:
            drawn["distill"] = (self.pool, sampler.sample(len(self.pool), cfg.distill_batch))
        if others and self.buffer is not None:
            drawn["buffer"] = (self.buffer, sampler.sample(len(self.buffer), cfg.buffer_batch))
        terms: dict[str, tuple[torch.Tensor, torch.Tensor | None, int, float]] = {}
        for name, (source, pick) in drawn.items():
            n = len(source) if pick is None else len(pick)
            local = pick if name in whole else shard.local(pick, n)
            terms[name] = (source if local is None else source[local], local, n,
                           1 / shard.world if name in whole else 1.0)
        inputs = [x for x, *_ in terms.values()]
        if self.merge and inputs:
            out = _rows_forward(self.forward, torch.cat(inputs), drawn).split([len(r) for r in inputs])
        else:
            out = [_rows_forward(self.forward, r, drawn) for r in inputs]
        return {name: Term(o, pick, n, share) for (name, (_, pick, n, share)), o in zip(terms.items(), out)}


def _spread(rowwise: Callable[[torch.Tensor], torch.Tensor], shard: Shard) -> Callable[[torch.Tensor], torch.Tensor]:
    """`rowwise` (a function of each row alone, in eval mode) over x, each rank computing its
    share of the rows (`Shard.local`) and every rank getting all of them; `rowwise` when alone."""
    if shard.world == 1:
        return rowwise

    def spread(x: torch.Tensor) -> torch.Tensor:
        local = shard.local(None, len(x))
        return shard.gather(rowwise(x[local]) if len(local) else rowwise(x[:1])[:0], len(x))
    return spread


def _rows_forward(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, drawn: dict) -> torch.Tensor:
    """forward(x); for a rank whose share is no row, one source row's output cut to none (a model
    may not take an empty batch; the empty output still joins the graph, so backward runs)."""
    if len(x):
        return forward(x)
    return forward(next(source for source, _ in drawn.values() if len(source))[:1])[:0]


_POOL_CHUNK_BYTES = 64 * 2**20  # the distillation pool's pixels are made this many bytes at a time


def _pool_chunks(cfg: UnlearnConfig, row: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor]) -> list[int]:
    """Sizes of the chunks the distillation pool is made in: `cfg.distill_pool` rows in all, fewer
    where a row as kept (its prefix features, or its pixels for the whole model) would take the
    pool past `cfg.distill_pool_mib` (but never under one batch, `cfg.distill_batch`); chunks of
    _POOL_CHUNK_BYTES of pixels, so the ~6 temporaries a pixel row needs stay bounded at 224 x 224.
    `row`: one input row, (1, C, H, W). A pool of 28 x 28 images is made in one chunk."""
    kept = encode(row).nbytes  # what the pool keeps: prefix features, or the pixels (no split)
    rows = min(cfg.distill_pool, max(cfg.distill_batch, cfg.distill_pool_mib * 2**20 // kept))
    chunk = max(1, _POOL_CHUNK_BYTES // row.nbytes)
    return [min(chunk, rows - i) for i in range(0, rows, chunk)]


def _same_prefix_suffix(teacher: nn.Module, split: FrozenPrefix | None, trainable: list[str],
                        example: torch.Tensor | None = None) -> nn.Module | None:
    """The teacher's suffix when its prefix is the student's frozen prefix, weight for weight
    and buffer for buffer, and it is in eval mode (as the student is whenever it is split);
    None otherwise."""
    if split is None:
        return None
    other = split_frozen_prefix(teacher, trainable, example)
    if other is None or other.cut != split.cut:
        return None
    mine, theirs = split.prefix.state_dict(), other.prefix.state_dict()
    if mine.keys() != theirs.keys() or not all(torch.equal(mine[k], theirs[k]) for k in mine):
        return None
    if any(m.training for m in teacher.modules()):  # the student's prefix is split in eval mode only
        return None
    return other.suffix


@dataclass
class AtRisk:
    """The objective rows a step trains on, so a step pays the full forward and backward only for
    rows its loss can move: the margin loss is exactly zero for a row whose goal gap is at or
    below -margin (README "The idea"), so such a row adds nothing to the loss or its gradient.
    Each step runs every row once without gradients (the stop test and the trend see all of them,
    this step, as before), then the fragment's k rows and the rows above -margin with gradients:
    the same loss and gradients, for a cost that grows with the retained set by a no-grad forward
    per row instead of a forward and a backward."""

    objective: Fragment  # the fragment's k rows first, then the retained set
    k: int
    margin: float

    @staticmethod
    def of(cfg: UnlearnConfig, objective: Fragment, k: int, whole: bool) -> AtRisk | None:
        """None where every row must run with gradients every step: a loss without a zero region
        (neg_ce), train mode (every forward moves BatchNorm statistics), `whole` (e.g. the feature
        goal), or no retained row."""
        if cfg.forget_loss != "margin" or cfg.train_mode or whole or len(objective) == k:
            return None
        return AtRisk(objective, k, cfg.margin)

    def check(self, inputs: StepInputs, shard: Shard = ALONE) -> tuple[torch.Tensor, torch.Tensor]:
        """((n,) bool every row's goal met, the rows to train on this step), from one forward
        without gradients (each rank its share of the rows, gathered)."""
        o, n = self.objective, len(self.objective)
        local = shard.local(None, n)
        y, target = (o.y, o.target) if local is None else (o.y[local], o.target[local])
        with torch.no_grad():
            logits = inputs.forward(inputs.objective if local is None else inputs.objective[local]) if (
                local is None or len(local)) else inputs.forward(inputs.objective[:1])[:0]
        gap, met = goal_gap(logits, y, target), goal_met(logits, y, target)
        if local is not None:
            both = shard.gather(torch.stack([gap, met.to(gap.dtype)], 1), n)
            gap, met = both[:, 0], both[:, 1] > 0
        risky = gap > -self.margin
        risky[: self.k] = True
        return met, torch.nonzero(risky).flatten()
