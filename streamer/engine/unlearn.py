"""The unlearning engine: one fragment at a time, continual across fragments.

Per fragment (the paper's Alg. 1 with k_CL-sized fragments): regenerate targeted L2-PGD
examples (Eq. 1) and, if used, MAS importance (Eq. 2) from the current model; then take
optimizer steps on the method's objective until every instance meets its goal, or a step or
time cap is hit -- the outcome says which, and how many instances still miss their goal.
"""
from __future__ import annotations

import dataclasses
import time
from contextlib import nullcontext
from typing import Callable

import torch
from torch import nn

from ..errors import Interrupted
from .attack import adversarial_examples
from .data import Dataset
from .distributed import ALONE, Shard, job_tensors
from .formats import clone_module
from .fragment import Cancelled, Fragment, FragmentOutcome, StopTest, Trend, cap_cause
from .importance import ImportancePenalty, mas_importance
from .memory import release_freed_memory
from .methods import METHODS, UnlearnConfig, method_config  # noqa: F401 (the engine's public API)
from .models import Normalized, grad_only
from .objectives import goal_met
from .prefix import plan_split, rows_independent
from .steps import TERMS, AtRisk, Sampler, StepInputs
from .terms import FragmentLoss
from .trainable import describe_trainable, select_trainable
from .unseen import UNSEEN, FeatureGoal, unseen_classes

__all__ = ["Fragment", "FragmentOutcome", "METHODS", "UnlearnConfig", "Unlearner", "method_config"]

Progress = Callable[[int, float, int], None]  # (step, loss, instances missing their goal)


class Unlearner:
    """Owns the model being unlearned, the frozen original (distillation teacher), the retained
    forgotten set and the optional retain buffer. `unlearn(fragment)` updates the model in place.

    Raises ConfigError at construction when `cfg.trainable` has a glob that matches no parameter.
    With a `shard` of a process group, rank 0 sends every fragment to the others first and the
    steps run data-parallel over the group (distributed.py; the others run `distributed.follow`)."""

    def __init__(self, model: nn.Module, cfg: UnlearnConfig, num_classes: int,
                 buffer: Dataset | None = None, forgotten: Fragment | None = None,
                 teacher: nn.Module | None = None, shard: Shard = ALONE):
        self.model, self.cfg, self.num_classes, self.shard = model, cfg, num_classes, shard
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
        self.sampler = Sampler(self.generator, self.device)
        self.fragments_done = 0

    def unlearn(self, fragment: Fragment, progress: Progress | None = None,
                cancel: Cancelled | None = None) -> FragmentOutcome:
        """Unlearn one fragment in place (the paper's Alg. 1 with the default's additions): resolve
        unseen goals, join the retained set, regenerate the adversarial examples (Eq. 1) and the
        importance (Eq. 2), then step until the stop test says so. With `cancel` set mid-way it
        stops with stopped_by="cancelled": the model is then partly updated and must be discarded.
        Raises distributed.GroupLost when another rank of the group is gone."""
        if self.shard.world > 1 and self.shard.rank == 0:
            self.shard.send_job("unlearn", job_tensors(self, fragment))
        should_stop = self.shard.stop_signal(cancel)
        stages: dict[str, float] = {}
        fragment, k = fragment.to(self.device), len(fragment)
        try:
            if bool((fragment.target == UNSEEN).any()):
                fragment = _timed(stages, "unseen", lambda: self.resolve_unseen(fragment, should_stop))
        except Interrupted:
            return _cancelled(k, 0, stages, k, 0, 0.0)
        retained = self.forgotten if (self.cfg.retain_forgotten and self.forgotten is not None) else None
        objective = Fragment.cat([fragment, retained]) if retained is not None else fragment
        features = FeatureGoal.build(self.net, self.teacher, self.buffer, self.num_classes, objective.y,
                                     objective.target, objective.unseen_mask(), self.cfg.unseen_feature_tol,
                                     self.cfg.unseen_feature_weight, self.cfg.unseen_confidence_weight,
                                     objective.x, self.cfg.unseen_confidence_neighbours,
                                     self.cfg.unseen_confidence_quantile)
        with torch.no_grad(), grad_only(self.model, train=False):
            met = goal_met(self.model(objective.x), objective.y, objective.target)
        resurrected = int((~met[k:]).sum())
        if bool(met.all()) and features is None and not self.cfg.train_mode:  # nothing to move: no attack
            return self._finish(fragment, objective, "goal", 0, met, ((0, 0),), resurrected, float("nan"), stages)
        try:
            split = rows_independent(self.model)  # the attack's rows split over ranks where they do not mix
            adv_x, adv_y, success = _timed(stages, "adversarial", lambda: adversarial_examples(
                self.model, fragment.x, fragment.y, self.cfg, self.num_classes, self.generator,
                ((lambda: cancel.is_set()) if cancel is not None else None) if split else should_stop,
                self.shard if split else ALONE))
            imp = _timed(stages, "importance", lambda: ImportancePenalty(
                self.model, mas_importance(self.model, fragment.x, should_stop=should_stop))
                if self.cfg.imp_lambda > 0 else None)
        except Interrupted:
            return _cancelled(k, 0, stages, k, resurrected, 0.0)
        t0 = time.perf_counter()
        stopped_by, steps, met, trend = self._steps(objective, k, adv_x, adv_y, imp, features, progress, cancel)
        stages["unlearn"] = time.perf_counter() - t0
        if stopped_by == "cancelled":
            return _cancelled(k, steps, stages, int((~met).sum()), resurrected, success, trend)
        outcome = self._finish(fragment, objective, stopped_by, steps, met, trend, resurrected, success, stages)
        if features is None:
            return outcome
        unmet_retained = int(features.unmet()[features.rows.cpu() >= k].sum())
        return dataclasses.replace(outcome, feature_gaps=features.row_gaps(len(objective))[:k], feature_tol=features.tol,
                                   confidence_excess=features.row_excess(len(objective))[:k],
                                   feature_unmet_retained=unmet_retained)

    def _steps(self, objective: Fragment, k: int, adv_x: torch.Tensor, adv_y: torch.Tensor,
               imp: ImportancePenalty | None, features: FeatureGoal | None, progress: Progress | None,
               cancel: Cancelled | None) -> tuple[str, int, torch.Tensor, tuple[tuple[int, int], ...]]:
        """The step loop: (stopped_by, steps taken, (n,) goal met per objective row, the trend)."""
        cfg, shard = self.cfg, self.shard
        params = self._trainable()
        optimizer = (torch.optim.Adam(params, lr=cfg.lr, fused=_fused_adam(cfg, params)) if cfg.optimizer == "adam"
                     else torch.optim.SGD(params, lr=cfg.lr))
        stop, trend = StopTest(cfg.max_steps, cfg.max_seconds, cancel), Trend()
        steps, stopped_by, met = 0, "step_cap", torch.zeros(len(objective), dtype=torch.bool)
        with grad_only(self.model, params, train=cfg.train_mode), features or nullcontext():  # no grads for the rest
            inputs = StepInputs.build(cfg, self.model, self.teacher, self.trainable, objective.x, adv_x, adv_y,
                                      self.buffer, self.sampler, shard)  # frozen-prefix features computed once
            loss_of = FragmentLoss(cfg, self.model, self.teacher, objective, k, inputs, self.sampler, self.buffer, imp,
                                   self._anchor(params), shard.world)
            risk = AtRisk.of(cfg, objective, k, whole=features is not None)
            whole, rows_shard = _whole_terms(cfg, inputs, features is not None, shard)
            while True:
                if features is not None:
                    features.clear()
                met, rows = risk.check(inputs, rows_shard) if risk is not None else (None, None)  # every row, no grads
                # merged: every term in one forward; else the objective first, the rest only when a step follows
                logits = inputs.logits(cfg, self.sampler, objective=True, rows=rows, shard=shard, whole=whole,
                                       others=inputs.merge)
                if met is None:
                    o = logits["objective"]
                    y, target = (objective.y, objective.target) if o.pick is None else (
                        objective.y[o.pick], objective.target[o.pick])
                    met = goal_met(o.out.detach(), y, target)
                    met = met if o.share < 1.0 else shard.gather(met, len(objective))  # whole: all rows here
                features_met, feature_loss = features.check(logits["objective"].out) if features is not None else (True, None)
                trend.observe(steps, int((~met).sum()))
                stopped = shard.agree(stop(steps, bool(met.all()), features_met))
                if stopped is not None:
                    stopped_by = stopped
                    break
                if not inputs.merge:  # train mode: no BatchNorm update from batches no step trains on
                    logits.update(inputs.logits(cfg, self.sampler, objective=False, shard=shard, whole=whole))
                loss = loss_of(logits, steps)
                if feature_loss is not None:
                    loss = loss + (feature_loss if shard.world == 1 else feature_loss / shard.world)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                loss = shard.reduce(params, loss)  # over every rank's rows, gradients summed: one process's
                if not torch.isfinite(loss):  # a step on it would make every weight NaN
                    optimizer.zero_grad(set_to_none=True)
                    stopped_by = "non_finite"
                    break
                optimizer.step()
                if cfg.train_mode:  # statistics moved under each rank's own dropout masks: the ranks agree again
                    shard.average_buffers(self.model)
                steps += 1
                if progress is not None and (steps % 25 == 0 or steps == 1):
                    progress(steps, loss.item(), int((~met).sum()))
            if cfg.train_mode:  # the last check's forward moved them too
                shard.average_buffers(self.model)
        return stopped_by, steps, met, trend.close(steps, int((~met).sum()))

    def _finish(self, fragment: Fragment, objective: Fragment, stopped_by: str, steps: int, met: torch.Tensor,
                trend: tuple[tuple[int, int], ...], resurrected: int, success_ratio: float,
                stages: dict[str, float]) -> FragmentOutcome:
        """The outcome of a fragment that ran to a stop other than cancellation; the fragment joins
        the retained set."""
        if self.cfg.retain_forgotten:
            self.forgotten = objective
        self.fragments_done += 1
        release_freed_memory()  # the resident size stays flat as the retained set grows (memory.py)
        met, k = met.cpu(), len(fragment)
        return FragmentOutcome(
            goal_reached=stopped_by == "goal", stopped_by=stopped_by, steps=steps,
            seconds=sum(stages.values()), fragment_met=met[:k].tolist(), missed=int((~met).sum()),
            resurrected_at_start=resurrected, attack_success_ratio=success_ratio, stage_seconds=stages,
            missed_trend=trend, cap_cause=cap_cause(stopped_by, trend),
            targets=fragment.target.cpu().tolist(),
        )

    def _anchor(self, params: list[nn.Parameter]) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """(trainable parameter, the teacher's value of it) for the L2 anchor (`anchor_weight`)."""
        if self.cfg.anchor_weight <= 0:
            return ()
        net = self.teacher.net if isinstance(self.teacher, Normalized) else self.teacher
        original = dict(net.named_parameters())
        return tuple((p, original[name].detach()) for p, name in zip(params, self.trainable))

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

    def describe_trainable(self, example: torch.Tensor | None = None) -> dict:
        """Which parameters move, for the start-up log: their names and counts (see `trainable`),
        and, given `example` input rows (n, C, H, W), how a step runs (`prefix.plan_split`: a
        frozen prefix cached per fragment, or the whole model and why)."""
        info = {"spec": list(self.cfg.trainable) or self.cfg.update, "parameters": list(self.trainable),
                **describe_trainable(self.net, self.trainable)}
        if example is not None:
            info["fast_path"] = ("off" if not self.cfg.fast_path or self.cfg.train_mode
                                 else plan_split(self.model, self.trainable, example.to(self.device))[1])
        return info

    def _trainable(self) -> list[nn.Parameter]:
        """The parameters unlearning moves, chosen at construction (see `trainable`). `head`: those of the Linear
        layers -- the classifier head of a CNN -- so the feature extractor, which every other
        input shares, stays as it is (measured on MNIST-5k: +3 to +11 points of test accuracy at
        the same forgetting)."""
        params = dict(self.net.named_parameters())
        return [params[name] for name in self.trainable]


def _whole_terms(cfg: UnlearnConfig, inputs: StepInputs, features: bool, shard: Shard) -> tuple[frozenset[str], Shard]:
    """(the terms every rank runs whole, the shard the stop test's check splits rows over): rows are
    split over ranks where they do not mix (eval mode, no batch statistics); the feature goal reads
    every objective row's features, so then each rank runs the objective whole."""
    if cfg.train_mode or not rows_independent(inputs.forward):
        return TERMS, ALONE
    return (frozenset({"objective"}) if features else frozenset()), shard


def _timed(stages: dict[str, float], stage: str, work: Callable):
    """`work()`, its seconds recorded in `stages[stage]` (also when it raises)."""
    t0 = time.perf_counter()
    try:
        return work()
    finally:
        stages[stage] = time.perf_counter() - t0


def _cancelled(k: int, steps: int, stages: dict[str, float], missed: int, resurrected: int, success: float,
               trend: tuple[tuple[int, int], ...] = ()) -> FragmentOutcome:
    return FragmentOutcome(False, "cancelled", steps, sum(stages.values()), [False] * k, missed, resurrected, success,
                           stages, trend)


def _fused_adam(cfg: UnlearnConfig, params: list[nn.Parameter]) -> bool:
    """Fast path: Adam's fused kernel (one per step instead of ~4 ops per parameter; measured on the
    MNIST-5k head: 0.14 ms instead of 0.38 ms a step) where torch has it, for floating parameters."""
    return (cfg.fast_path and bool(params) and params[0].device.type in ("cpu", "cuda")
            and all(p.is_floating_point() for p in params))
