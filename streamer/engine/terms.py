"""The terms of a fragment's objective (the paper's Eq. 6 and 7, plus the default's additions), as
one component the step loop calls: forgetting, adversarial examples, data-free distillation from
the original model, the opt-in retain buffer, MAS importance, and the unseen feature goal."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .data import Dataset
from .fragment import Fragment
from .importance import ImportancePenalty
from .methods import UnlearnConfig
from .objectives import distillation_loss, forget_loss
from .steps import Logits, Sampler, StepInputs, Term, distill_inputs

__all__ = ["FragmentLoss"]


@dataclass
class FragmentLoss:
    """The method's loss on one step's logits (`StepInputs.logits`), for the fragment's objective
    (`objective`: the fragment's k instances first, then the retained set)."""

    cfg: UnlearnConfig
    model: nn.Module
    teacher: nn.Module
    objective: Fragment
    k: int  # instances of the fragment itself
    inputs: StepInputs
    sampler: Sampler
    buffer: Dataset | None = None
    importance: ImportancePenalty | None = None
    anchor: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()  # (trainable parameter, the original's value)
    world: int = 1  # ranks (distributed.Shard): terms of the weights alone count 1/world on each

    def __call__(self, logits: Logits, step: int) -> torch.Tensor:
        """The scalar loss of `step` (0-based): forget + adversarial + distillation + buffer + importance.
        Distributed: this rank's part, the ranks' parts summing to the loss of one process."""
        cfg = self.cfg
        loss = self.forget_and_adversarial(logits)
        if cfg.distill_weight > 0:
            loss = loss + self.distill_weight(step) * self.distillation(logits)
        if "buffer" in logits and self.buffer is not None:
            t = logits["buffer"]
            loss = loss + cfg.buffer_weight * _part(F.cross_entropy(t.out, self.buffer.y[t.pick]), t)
        weights_only = []
        if self.importance is not None:
            weights_only.append(cfg.imp_lambda * self.importance.penalty(self.model))  # Eq. 7
        if cfg.anchor_weight > 0 and self.anchor:
            weights_only.append(cfg.anchor_weight * sum((p - p0).pow(2).sum() for p, p0 in self.anchor))  # L2-SP
        for term in weights_only:
            loss = loss + (term if self.world == 1 else term / self.world)
        return loss

    def forget_and_adversarial(self, logits: Logits) -> torch.Tensor:
        """The forgetting term on the objective (the rows drawn: `steps.AtRisk`) and the cross-entropy of the adversarial examples
        to their target classes. `proportional`: Eq. 6, one mean over D_f and D_adv together, each
        term weighted by its share; `fragment`: the forgetting term divided by k, not diluted by the
        retained set or the adversarial batch, plus the adversarial batch's mean."""
        cfg, obj = self.cfg, logits["objective"]
        y, target = (self.objective.y, self.objective.target) if obj.pick is None else (
            self.objective.y[obj.pick], self.objective.target[obj.pick])
        forget = forget_loss(cfg.forget_loss, obj.out, y, target, cfg.margin).sum() * obj.share
        adv = logits.get("adv")
        if adv is not None:
            adv_y = self.inputs.adv_y if adv.pick is None else self.inputs.adv_y[adv.pick]
            adv_sum = F.cross_entropy(adv.out, adv_y, reduction="sum")
        if cfg.weighting == "proportional":
            total = obj.n + len(self.inputs.adv_y)
            loss = forget / total
            if adv is not None:
                loss = loss + cfg.adv_weight * adv_sum / total
            return loss
        loss = forget / self.k
        if adv is not None:
            loss = loss + cfg.adv_weight * adv_sum / adv.n
        return loss

    def distillation(self, logits: Logits) -> torch.Tensor:
        """KL from the teacher on distillation inputs: a batch of the fast path's pool (teacher
        logits cached), else inputs made this step from the objective (and a batch of the buffer)."""
        cfg = self.cfg
        if "distill" in logits:
            t = logits["distill"]
            assert self.inputs.pool_teacher is not None and t.pick is not None  # the pool comes with its logits
            return _part(distillation_loss(t.out, self.inputs.pool_teacher[t.pick], cfg.distill_temperature), t)
        # every rank makes the same inputs and runs them whole: each counts 1/world of it
        source = self.objective.x
        if self.buffer is not None and cfg.distill_buffer:  # real images: their warps and mixups are distilled too
            source = torch.cat([source, self.buffer.x[self.sampler.sample(len(self.buffer), cfg.buffer_batch)]])
        pixels = distill_inputs(source, self.inputs.adv_pixels, cfg.distill_batch, cfg.distill_warp, self.sampler)
        with torch.no_grad():
            teacher = self.teacher(pixels)
        student = self.model(pixels)
        loss = distillation_loss(student, teacher, cfg.distill_temperature)
        return loss if self.world == 1 else loss / self.world

    def distill_weight(self, step: int) -> float:
        """Strong distillation keeps the most accuracy but can stall forgetting; halving it every
        `distill_halve_every` steps (0: never) trades a little accuracy for reaching the goal
        before the step cap on the hardest fragments."""
        every = self.cfg.distill_halve_every
        return self.cfg.distill_weight * 0.5 ** (step // every if every > 0 else 0)


def _part(mean: torch.Tensor, term: Term) -> torch.Tensor:
    """A mean over this rank's rows of `term` as its part of the mean over every rank's rows (the
    same value when alone: m / n = 1; a zero in the graph for a rank with no row of it)."""
    if len(term.out) == 0:
        return term.out.sum() * 0.0
    return mean if len(term.out) == term.n and term.share == 1.0 else mean * (len(term.out) * term.share / term.n)
