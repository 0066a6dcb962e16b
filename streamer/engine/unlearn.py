"""The unlearning engine: one fragment at a time, continual across fragments.

Per fragment (the paper's Alg. 1 with k_CL-sized fragments): regenerate targeted L2-PGD
examples (Eq. 1) and, if used, MAS importance (Eq. 2) from the current model; then take
optimizer steps on the method's objective until every instance meets its goal, or a step or
time cap is hit -- the outcome says which, and how many instances still miss their goal.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .attack import random_targets, targeted_l2_pgd
from ..errors import Interrupted
from .data import Dataset
from .formats import clone_module
from .importance import ImportancePenalty, mas_importance
from .models import Normalized, grad_only
from .methods import METHODS, UnlearnConfig, method_config  # noqa: F401 (the engine's public API)
from .objectives import distillation_loss, forget_loss, goal_met
from .prefix import FrozenPrefix, cpu_channels_last, rows_independent, split_frozen_prefix
from .trainable import describe_trainable, select_trainable
from .unseen import UNSEEN, class_prototypes, last_linear, unseen_classes
from .augment import random_affine  # noqa: F401 (re-exported)
from .fragment import _TREND_EVERY, Fragment, FragmentOutcome, cap_cause  # noqa: F401 (re-exported)

Progress = Callable[[int, float, int], None]  # (step, loss, instances missing their goal)


class Cancelled(Protocol):
    def is_set(self) -> bool: ...  # e.g. threading.Event


class Unlearner:
    """Owns the model being unlearned, the frozen original (distillation teacher), the retained
    forgotten set and the optional retain buffer. `unlearn(fragment)` updates the model in place.

    Raises ConfigError at construction when `cfg.trainable` has a glob that matches no parameter."""

    def __init__(self, model: nn.Module, cfg: UnlearnConfig, num_classes: int,
                 buffer: Dataset | None = None, forgotten: Fragment | None = None,
                 teacher: nn.Module | None = None):
        self.model, self.cfg, self.num_classes = model, cfg, num_classes
        self.device = next(model.parameters()).device
        # The user's network: trainable names are its own (`fc.weight`, not `net.fc.weight`).
        self.net = model.net if isinstance(model, Normalized) else model
        self.trainable = select_trainable(self.net, cfg.trainable_spec)
        # clone_module, not deepcopy: a deep-copied TorchScript module has non-leaf parameters.
        self.teacher = teacher if teacher is not None else clone_module(model)
        self.teacher.eval()
        for p in self.teacher.parameters():  # Module.requires_grad_ is refused by a bare ScriptModule
            p.requires_grad_(False)
        self.buffer = buffer if buffer is None else Dataset(buffer.x.to(self.device), buffer.y.to(self.device))
        self.forgotten = forgotten.to(self.device) if forgotten is not None else None
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.fragments_done = 0

    def unlearn(self, fragment: Fragment, progress: Progress | None = None,
                cancel: Cancelled | None = None) -> FragmentOutcome:
        """Unlearn one fragment in place. With `cancel` set mid-way it stops with
        stopped_by="cancelled": the model is then partly updated and must be discarded."""
        cfg, model = self.cfg, self.model
        should_stop = (lambda: cancel.is_set()) if cancel is not None else None  # noqa: E731
        stages: dict[str, float] = {}
        fragment = fragment.to(self.device)
        k = len(fragment)
        if bool((fragment.target == UNSEEN).any()):
            t0 = time.perf_counter()
            try:
                fragment = self.resolve_unseen(fragment, should_stop)
            except Interrupted:
                return FragmentOutcome(False, "cancelled", 0, time.perf_counter() - t0, [False] * k, k, 0, 0.0, {})
            stages["unseen"] = time.perf_counter() - t0
        retained = self.forgotten if (cfg.retain_forgotten and self.forgotten is not None) else None
        objective = Fragment.cat([fragment, retained]) if retained is not None else fragment
        proto = self._prototype_goal(objective)
        with torch.no_grad(), grad_only(model, train=False):
            met = goal_met(model(objective.x), objective.y, objective.target)
        resurrected = int((~met[k:]).sum())
        if bool(met.all()) and proto is None and not cfg.train_mode:  # nothing to move (e.g. unseen typical instances): no attack
            return self._finish(fragment, objective, "goal", 0, met, [(0, 0)], resurrected, float("nan"), stages)

        try:
            t0 = time.perf_counter()
            adv_x, adv_y, success_ratio = self._adversarial(fragment, should_stop)
            stages["adversarial"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            imp = (ImportancePenalty(model, mas_importance(model, fragment.x, should_stop=should_stop))
                   if cfg.imp_lambda > 0 else None)
            stages["importance"] = time.perf_counter() - t0
        except Interrupted:
            return FragmentOutcome(False, "cancelled", 0, sum(stages.values()), [False] * k, k, resurrected, 0.0,
                                   stages)

        t0 = time.perf_counter()
        params = self._trainable()
        optimizer = (torch.optim.Adam(params, lr=cfg.lr, fused=_fused_adam(cfg, params)) if cfg.optimizer == "adam"
                     else torch.optim.SGD(params, lr=cfg.lr))
        steps, stopped_by, met = 0, "step_cap", torch.zeros(len(objective), dtype=torch.bool)
        trend: list[tuple[int, int]] = []  # (step, instances missing their goal), every _TREND_EVERY steps
        caught: list[torch.Tensor] = []
        hook = (last_linear(self.net).register_forward_hook(lambda _m, i, _o: caught.append(i[0].flatten(1)))
                if proto is not None else None)
        with grad_only(model, params, train=cfg.train_mode):  # no gradients for the weights that stay put
            inputs = self._step_inputs(objective, adv_x, adv_y)  # frozen-prefix features computed once
            while True:
                caught.clear()
                # merged: every term in one forward; else the objective first, the rest only when a step follows
                logits = (self._step_logits(inputs, objective=True) if inputs.merge
                          else {"objective": (inputs.forward(inputs.objective), None)})
                met = goal_met(logits["objective"][0].detach(), objective.y, objective.target)
                features_met, proto_loss = True, None
                if proto is not None:  # memorised unseen rows: their features within tol of their class's prototype
                    rows, target_features = proto
                    gap = ((caught[0][rows] - target_features).pow(2).sum(1)
                           / target_features.pow(2).sum(1).clamp_min(1e-12))  # squared relative L2 distance
                    features_met = bool((gap.detach().sqrt() <= cfg.unseen_feature_tol).all())
                    proto_loss = cfg.unseen_feature_weight * gap.mean()
                if steps % _TREND_EVERY == 0:
                    trend.append((steps, int((~met).sum())))
                if bool(met.all()) and features_met:
                    stopped_by = "goal"
                    break
                capped = ("step_cap" if steps >= cfg.max_steps
                          else "time_cap" if time.perf_counter() - t0 >= cfg.max_seconds else None)
                if capped is not None:  # the feature goal is best effort: with every class goal met, the goal
                    stopped_by = "goal" if bool(met.all()) else capped
                    break
                if cancel is not None and cancel.is_set():
                    stopped_by = "cancelled"
                    break
                if not inputs.merge:  # train mode: no BatchNorm update from batches no step trains on
                    logits.update(self._step_logits(inputs, objective=False))
                loss = self._loss(logits, objective, k, inputs, imp, steps)
                if proto_loss is not None:
                    loss = loss + proto_loss
                if not torch.isfinite(loss):  # a step on it would make every weight NaN
                    stopped_by = "non_finite"
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps += 1
                if progress is not None and (steps % 25 == 0 or steps == 1):
                    progress(steps, loss.item(), int((~met).sum()))
        if hook is not None:
            hook.remove()
        if not trend or trend[-1][0] != steps:
            trend.append((steps, int((~met).sum())))
        stages["unlearn"] = time.perf_counter() - t0

        if stopped_by == "cancelled":
            return FragmentOutcome(False, stopped_by, steps, sum(stages.values()), [False] * k,
                                   int((~met).sum()), resurrected, success_ratio, stages, tuple(trend))
        return self._finish(fragment, objective, stopped_by, steps, met, trend, resurrected, success_ratio, stages)

    def _finish(self, fragment: Fragment, objective: Fragment, stopped_by: str, steps: int, met: torch.Tensor,
                trend: list[tuple[int, int]], resurrected: int, success_ratio: float,
                stages: dict[str, float]) -> FragmentOutcome:
        """The outcome of a fragment that ran to a stop other than cancellation; the fragment joins
        the retained set."""
        if self.cfg.retain_forgotten:
            self.forgotten = objective
        self.fragments_done += 1
        met, k = met.cpu(), len(fragment)
        return FragmentOutcome(
            goal_reached=stopped_by == "goal", stopped_by=stopped_by, steps=steps,
            seconds=sum(stages.values()), fragment_met=met[:k].tolist(), missed=int((~met).sum()),
            resurrected_at_start=resurrected, attack_success_ratio=success_ratio, stage_seconds=stages,
            missed_trend=tuple(trend), cap_cause=cap_cause(stopped_by, trend),
            targets=fragment.target.cpu().tolist(),
        )

    def _prototype_goal(self, objective: Fragment):
        """(rows, (m, D) target features) for the feature goal of the objective's memorised `unseen`
        instances, this fragment's and the retained ones' (their class is not their label): the teacher's mean penultimate features over the retain buffer's
        images of that class (`unseen.class_prototypes`). None when off (`unseen_feature_weight` 0),
        without a buffer or an eager nn.Linear head, or when no row has a class the buffer holds."""
        if self.cfg.unseen_feature_weight <= 0 or self.buffer is None or last_linear(self.net) is None:
            return None
        rows = torch.nonzero(objective.unseen_mask() & (objective.target >= 0) & (objective.target != objective.y)).flatten()
        if len(rows) == 0:
            return None
        targets = class_prototypes(self.teacher, self.buffer, self.num_classes)[objective.target[rows]]
        keep = torch.isfinite(targets).all(1)
        return (rows[keep], targets[keep]) if bool(keep.any()) else None

    def resolve_unseen(self, fragment: Fragment, should_stop: Callable[[], bool] | None = None) -> Fragment:
        """The fragment with each `unseen` target (-2) replaced by the class the teacher's warp vote
        gives it (`unseen.unseen_classes`); other targets unchanged. Seeded by cfg.seed and each
        image's pixels: an image gets the same class in any fragment. Raises Interrupted when
        `should_stop()` turns true (checked between batches of warps)."""
        pending = fragment.target == UNSEEN
        if not bool(pending.any()):
            return fragment
        classes = unseen_classes(self.teacher, fragment.x[pending], self.cfg.seed, should_stop=should_stop,
                                 y=fragment.y[pending])
        return Fragment(fragment.x, fragment.y, fragment.target.masked_scatter(pending, classes.to(self.device)),
                        fragment.unseen_mask())

    def describe_trainable(self) -> dict:
        """Which parameters move, for the start-up log: their names and counts (see `trainable`)."""
        return {"spec": list(self.cfg.trainable) or self.cfg.update, "parameters": list(self.trainable),
                **describe_trainable(self.net, self.trainable)}

    def _trainable(self) -> list[nn.Parameter]:
        """The parameters unlearning moves, chosen at construction (see `trainable`). `head`: those of the Linear
        layers -- the classifier head of a CNN -- so the feature extractor, which every other
        input shares, stays as it is (measured on MNIST-5k: +3 to +11 points of test accuracy at
        the same forgetting)."""
        params = dict(self.net.named_parameters())
        return [params[name] for name in self.trainable]

    def _adversarial(self, fragment: Fragment, should_stop=None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Targeted L2-PGD examples from the current model, labelled with their targets."""
        cfg = self.cfg
        if not cfg.uses_adv or cfg.n_adv == 0:
            return fragment.x[:0], fragment.y[:0], 0.0
        eps = cfg.pgd_eps or cfg.pgd_eps_ratio * float(fragment.x.flatten(1).norm(dim=1).mean())
        step_size = cfg.pgd_step_size or 2.5 * eps / cfg.pgd_steps
        index, target = random_targets(fragment.y, cfg.n_adv, self.num_classes, self.generator)
        attacked = cpu_channels_last(self.model, fragment.x[:2]) if cfg.fast_path else self.model
        result = targeted_l2_pgd(attacked, fragment.x[index.to(self.device)], target.to(self.device),
                                 eps=eps, step_size=step_size, steps=cfg.pgd_steps, generator=self.generator,
                                 should_stop=should_stop, early_exit=cfg.pgd_early_exit)
        keep = result.success if cfg.adv_only_successful else torch.ones_like(result.success)
        return result.x[keep], result.target[keep], result.success_rate

    def _step_inputs(self, objective: Fragment, adv_x: torch.Tensor, adv_y: torch.Tensor) -> "_StepInputs":
        """What every step feeds the model. Fast path, eval mode, a splittable network: the frozen
        prefix's features of the objective, the adversarial examples and the retain buffer, so a
        step runs the trainable suffix only (same arithmetic: eval mode makes the prefix a fixed
        function); and the distillation pool. Otherwise the pixels, through the whole model."""
        cfg = self.cfg
        split = split_frozen_prefix(self.model, self.trainable) if cfg.fast_path and not cfg.train_mode else None
        if split is not None:  # fixed while the fragment runs: a channels-last copy computes it on CPU
            split = dataclasses.replace(split, prefix=cpu_channels_last(split.prefix, objective.x[:2]))
        encode = split.features if split is not None else (lambda x: x)  # noqa: E731
        forward = split.suffix if split is not None else self.model
        buffer_in = encode(self.buffer.x) if self.buffer is not None and cfg.buffer_weight > 0 else None
        pool = pool_teacher = None
        if cfg.fast_path and cfg.distill_weight > 0:
            source = objective.x
            if self.buffer is not None and cfg.distill_buffer:
                source = torch.cat([source, self.buffer.x])
            pixels = self._distill_inputs(source, adv_x, cfg.distill_pool)
            pool = encode(pixels)
            # The teacher shares the frozen prefix while it holds the same weights (head-only
            # updates keep it so): its logits are then its suffix on the same features.
            teacher_suffix = _same_prefix_suffix(self.teacher, split, self.trainable)
            with torch.no_grad():
                pool_teacher = (torch.cat([teacher_suffix(c) for c in pool.split(512)]) if teacher_suffix is not None
                                else torch.cat([self.teacher(c) for c in pixels.split(512)]))
        # one forward per step over all terms: fast path, eval mode, rows that do not mix
        merge = cfg.fast_path and not cfg.train_mode and rows_independent(forward)
        return _StepInputs(forward, split, encode(objective.x), encode(adv_x) if len(adv_x) else adv_x, adv_y, adv_x,
                           buffer_in, pool, pool_teacher, merge)

    def _step_logits(self, inputs: "_StepInputs", objective: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """This step's logits per term, with the rows each term drew: objective (all; if `objective`),
        adv (a batch of the adversarial examples; all of them with proportional weighting), distill
        (a batch of the fast path's pool), buffer (a batch of the retain buffer). With
        `inputs.merge` one forward over all the rows (measured on the MNIST-5k head: 1.7 ms instead
        of 2.8 ms per forward and backward); otherwise one per term."""
        cfg = self.cfg
        terms: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = (
            {"objective": (inputs.objective, None)} if objective else {})
        if len(inputs.adv_y):
            pick = None if cfg.weighting == "proportional" else self._sample(len(inputs.adv_y), cfg.adv_batch)
            terms["adv"] = (inputs.adv if pick is None else inputs.adv[pick], pick)
        if cfg.distill_weight > 0 and inputs.pool is not None:
            pick = self._sample(len(inputs.pool), cfg.distill_batch)
            terms["distill"] = (inputs.pool[pick], pick)
        if inputs.buffer is not None:
            pick = self._sample(len(self.buffer), cfg.buffer_batch)
            terms["buffer"] = (inputs.buffer[pick], pick)
        rows = [x for x, _ in terms.values()]
        if inputs.merge and rows:
            out = inputs.forward(torch.cat(rows)).split([len(r) for r in rows])
        else:
            out = [inputs.forward(r) for r in rows]
        return {name: (o, pick) for (name, (_, pick)), o in zip(terms.items(), out)}

    def _loss(self, logits: dict, objective: Fragment, k: int, inputs: "_StepInputs", imp, step: int) -> torch.Tensor:
        """The method's objective (Eq. 6, plus distillation and the buffer) on `_step_logits`' output."""
        cfg, model = self.cfg, self.model
        per_instance = forget_loss(cfg.forget_loss, logits["objective"][0], objective.y, objective.target, cfg.margin)
        adv, adv_y = logits.get("adv"), inputs.adv_y
        if cfg.weighting == "proportional":
            # Eq. 6: one mean over D_f and D_adv together, each term weighted by its share
            total = len(per_instance) + len(adv_y)
            loss = per_instance.sum() / total
            if adv is not None:
                loss = loss + cfg.adv_weight * F.cross_entropy(adv[0], adv_y, reduction="sum") / total
        else:
            loss = per_instance.sum() / k  # not diluted by the retained set or the adv batch
            if adv is not None:
                loss = loss + cfg.adv_weight * F.cross_entropy(adv[0], adv_y[adv[1]])
        if cfg.distill_weight > 0:
            if "distill" in logits:  # a batch of the fragment's pool, teacher outputs cached
                student, pick = logits["distill"]
                teacher = inputs.pool_teacher[pick]
            else:
                source = objective.x
                if self.buffer is not None and cfg.distill_buffer:  # real images: their warps and mixups are distilled too
                    source = torch.cat([source, self.buffer.x[self._sample(len(self.buffer), cfg.buffer_batch)]])
                pixels = self._distill_inputs(source, inputs.adv_pixels)
                with torch.no_grad():
                    teacher = self.teacher(pixels)
                student = model(pixels)
            loss = loss + self._distill_weight(step) * distillation_loss(student, teacher, cfg.distill_temperature)
        if "buffer" in logits:
            out, pick = logits["buffer"]
            loss = loss + cfg.buffer_weight * F.cross_entropy(out, self.buffer.y[pick])
        if imp is not None:
            loss = loss + cfg.imp_lambda * imp.penalty(model)
        return loss

    def _distill_weight(self, step: int) -> float:
        """Strong distillation keeps the most accuracy but can stall forgetting; halving it every
        `distill_halve_every` steps trades a little accuracy for reaching the goal before the
        step cap on the hardest fragments."""
        every = self.cfg.distill_halve_every
        return self.cfg.distill_weight * 0.5 ** (step // every if every > 0 else 0)

    def _sample(self, n: int, batch: int) -> torch.Tensor:
        if n <= batch:
            return torch.arange(n, device=self.device)
        return torch.randint(0, n, (batch,), generator=self.generator).to(self.device)

    def _draw(self, n: int, count: int) -> torch.Tensor:
        return torch.randint(0, n, (count,), generator=self.generator).to(self.device)

    def _distill_inputs(self, x: torch.Tensor, adv_x: torch.Tensor, count: int | None = None) -> torch.Tensor:
        """(distill_batch, C, H, W) inputs made from the forget set (and the retain buffer's images
        when there is one): mixup of pairs, random affine warps (rotation, scale, translation)
        and the adversarial examples -- never a forget instance as it is, whose teacher output
        is exactly what must be unlearned. A warped instance looks like another example of its
        class, so the teacher's outputs on them hold what the original model knew about the
        classes being forgotten from. (count, C, H, W) with `count`; the fast path makes
        `distill_pool` of them once per fragment and samples `distill_batch` per step."""
        n, g, dev = count or self.cfg.distill_batch, self.generator, self.device
        pool = torch.cat([x, adv_x]) if len(adv_x) else x
        a = pool[self._draw(len(pool), n)]
        b = pool[self._draw(len(pool), n)]
        lam = torch.rand(n, 1, 1, 1, generator=g).to(dev)
        mixed = lam * a + (1 - lam) * b
        if self.cfg.distill_warp == "affine":
            warped = random_affine(a, g)
        else:
            shifts = torch.randint(-2, 3, (2,), generator=g).tolist()
            warped = torch.roll(a, shifts=shifts, dims=(2, 3)) + 0.1 * torch.randn(a.shape, generator=g).to(dev)
        adv = adv_x[self._draw(len(adv_x), n)] if len(adv_x) else warped
        choice = torch.randint(0, 3, (n, 1, 1, 1), generator=g).to(dev)
        out = torch.where(choice == 0, mixed, torch.where(choice == 1, warped, adv))
        return out.clamp(0.0, 1.0)


def _fused_adam(cfg: UnlearnConfig, params: list[nn.Parameter]) -> bool:
    """Fast path: Adam's fused kernel (one per step instead of ~4 ops per parameter; measured on the
    MNIST-5k head: 0.14 ms instead of 0.38 ms a step) where torch has it, for floating parameters."""
    return (cfg.fast_path and bool(params) and params[0].device.type in ("cpu", "cuda")
            and all(p.is_floating_point() for p in params))


def _same_prefix_suffix(teacher: nn.Module, split: FrozenPrefix | None, trainable: list[str]) -> nn.Module | None:
    """The teacher's suffix when its prefix is the student's frozen prefix, weight for weight
    and buffer for buffer, and it is in eval mode (as the student is whenever it is split);
    None otherwise."""
    if split is None:
        return None
    other = split_frozen_prefix(teacher, trainable)
    if other is None or other.length != split.length:
        return None
    mine, theirs = split.prefix.state_dict(), other.prefix.state_dict()
    if mine.keys() != theirs.keys() or not all(torch.equal(mine[k], theirs[k]) for k in mine):
        return None
    if any(m.training for m in teacher.modules()):  # the student's prefix is split in eval mode only
        return None
    return other.suffix


@dataclass(frozen=True)
class _StepInputs:
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
    merge: bool = False  # one forward per step over every term's rows (see Unlearner._step_logits)
