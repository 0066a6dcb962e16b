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
from .steps import Logits, Sampler, StepInputs, distill_inputs

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

    def __call__(self, logits: Logits, step: int) -> torch.Tensor:
        """The scalar loss of `step` (0-based): forget + adversarial + distillation + buffer + importance."""
        cfg = self.cfg
        loss = self.forget_and_adversarial(logits)
        if cfg.distill_weight > 0:
            loss = loss + self.distill_weight(step) * self.distillation(logits)
        if "buffer" in logits and self.buffer is not None:
            out, pick = logits["buffer"]
            loss = loss + cfg.buffer_weight * F.cross_entropy(out, self.buffer.y[pick])
        if self.importance is not None:
            loss = loss + cfg.imp_lambda * self.importance.penalty(self.model)  # Eq. 7
        if cfg.anchor_weight > 0 and self.anchor:
            loss = loss + cfg.anchor_weight * sum((p - p0).pow(2).sum() for p, p0 in self.anchor)  # L2-SP
        return loss

    def forget_and_adversarial(self, logits: Logits) -> torch.Tensor:
        """The forgetting term on the objective (the rows drawn: `steps.AtRisk`) and the cross-entropy of the adversarial examples
        to their target classes. `proportional`: Eq. 6, one mean over D_f and D_adv together, each
        term weighted by its share; `fragment`: the forgetting term divided by k, not diluted by the
        retained set or the adversarial batch, plus the adversarial batch's mean."""
        cfg, (z, rows) = self.cfg, logits["objective"]
        y, target = (self.objective.y, self.objective.target) if rows is None else (
            self.objective.y[rows], self.objective.target[rows])
        per_instance = forget_loss(cfg.forget_loss, z, y, target, cfg.margin)
        adv, adv_y = logits.get("adv"), self.inputs.adv_y
        if cfg.weighting == "proportional":
            total = len(per_instance) + len(adv_y)
            loss = per_instance.sum() / total
            if adv is not None:
                loss = loss + cfg.adv_weight * F.cross_entropy(adv[0], adv_y, reduction="sum") / total
            return loss
        loss = per_instance.sum() / self.k
        if adv is not None:
            loss = loss + cfg.adv_weight * F.cross_entropy(adv[0], adv_y[adv[1]])
        return loss

    def distillation(self, logits: Logits) -> torch.Tensor:
        """KL from the teacher on distillation inputs: a batch of the fast path's pool (teacher
        logits cached), else inputs made this step from the objective (and a batch of the buffer)."""
        cfg = self.cfg
        if "distill" in logits:
            student, pick = logits["distill"]
            assert self.inputs.pool_teacher is not None and pick is not None  # the pool comes with its logits
            teacher = self.inputs.pool_teacher[pick]
        else:
            source = self.objective.x
            if self.buffer is not None and cfg.distill_buffer:  # real images: their warps and mixups are distilled too
                source = torch.cat([source, self.buffer.x[self.sampler.sample(len(self.buffer), cfg.buffer_batch)]])
            pixels = distill_inputs(source, self.inputs.adv_pixels, cfg.distill_batch, cfg.distill_warp, self.sampler)
            with torch.no_grad():
                teacher = self.teacher(pixels)
            student = self.model(pixels)
        return distillation_loss(student, teacher, cfg.distill_temperature)

    def distill_weight(self, step: int) -> float:
        """Strong distillation keeps the most accuracy but can stall forgetting; halving it every
        `distill_halve_every` steps (0: never) trades a little accuracy for reaching the goal
        before the step cap on the hardest fragments."""
        every = self.cfg.distill_halve_every
        return self.cfg.distill_weight * 0.5 ** (step // every if every > 0 else 0)
