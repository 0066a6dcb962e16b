"""Targeted L2 projected gradient descent (the paper's Eq. 1).

x_adv = argmin_{||x' - x||_2 <= eps, x' in [0,1]} CE(f(x'), t): random start in the eps-ball,
normalised gradient steps, projection onto the ball and the pixel range after every step.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import Interrupted
from .distributed import ALONE, Shard
from .methods import UnlearnConfig
from .models import grad_only
from .prefix import cpu_channels_last


@dataclass(frozen=True)
class AttackResult:
    x: torch.Tensor  # (N, C, H, W) adversarial examples
    target: torch.Tensor  # (N,) the class each was pushed to
    success: torch.Tensor  # (N,) bool: the model predicts the target

    @property
    def success_rate(self) -> float:
        return float(self.success.float().mean()) if len(self.success) else 0.0


def _project_l2(delta: torch.Tensor, eps: float) -> torch.Tensor:
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return delta * torch.clamp(eps / norms, max=1.0)


def _random_in_ball(shape: torch.Size, eps: float, generator: torch.Generator | None, device) -> torch.Tensor:
    direction = torch.randn(shape, generator=generator, device="cpu").to(device)
    direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    radius = torch.rand(shape[0], generator=generator, device="cpu").to(device).view(-1, 1, 1, 1)
    return direction * radius * eps


def targeted_l2_pgd(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    chunk_size: int = 512,
    generator: torch.Generator | None = None,
    should_stop: Callable[[], bool] | None = None,
    early_exit: bool = False,
    shard: Shard = ALONE,
) -> AttackResult:
    """Attack each x[i] towards target[i]; x is not modified; the model's mode and its
    parameters' requires_grad are restored. Chunks of `chunk_size` bound memory.

    early_exit: an example stops moving at the first iteration whose forward pass predicts its
    target (its x_adv is then the one that was predicted as the target), and the chunk stops
    when every example has. Examples never reach their target run all `steps` iterations along
    the same path as without it (examples do not interact in eval mode), so a failed attack
    stays exactly as it was; one that succeeded without early exit also succeeds with it.

    x: (N, C, H, W) pixels in [0, 1]; target: (N,) class indices. Raises `Interrupted` within one
    PGD iteration of `should_stop()` turning true. With a `shard` of a process group each rank
    attacks its share of the rows (`Shard.local`) and every rank gets all the examples: the same
    ones, since each row's start is drawn for all rows first; `should_stop` is then rank 0's own,
    and the ranks agree on it once the shares are done."""
    start = _random_in_ball(x.shape, eps, generator, x.device)  # drawn once: chunking changes nothing
    local = shard.local(None, len(x))
    mine = slice(None) if local is None else local
    xs, starts, targets = x[mine], start[mine], target[mine]
    interrupted = False
    try:
        with grad_only(model):  # gradients for the inputs only, BatchNorm and dropout frozen
            chunks = [
                _attack_chunk(model, xs[i : i + chunk_size], starts[i : i + chunk_size], targets[i : i + chunk_size],
                              eps, step_size, steps, should_stop, early_exit)
                for i in range(0, len(xs), chunk_size)
            ]
    except Interrupted:
        if shard.world == 1:
            raise
        interrupted, chunks = True, []
    if shard.world > 1 and shard.agree("cancelled" if interrupted else None) == "cancelled":
        raise Interrupted("stop requested during the adversarial attack")
    x_adv = torch.cat(chunks) if chunks else xs.clone()
    with torch.no_grad():
        success = _predict(model, x_adv) == targets if len(x_adv) else torch.zeros(0, dtype=torch.bool, device=x.device)
    if local is not None:
        x_adv, success = shard.gather(x_adv, len(x)), shard.gather(success, len(x))
    return AttackResult(x_adv, target.clone(), success)


def _attack_chunk(model, x, start, target, eps, step_size, steps, should_stop, early_exit=False) -> torch.Tensor:
    x = x.detach()
    x_adv = (x + start).clamp(0.0, 1.0)
    active = torch.arange(len(x), device=x.device)  # examples still moving (all, without early exit)
    for _ in range(steps):
        if should_stop is not None and should_stop():
            raise Interrupted("stop requested during the adversarial attack")
        cur = x_adv[active].requires_grad_(True)  # (A, C, H, W)
        logits = model(cur)
        moving = torch.ones(len(active), dtype=torch.bool, device=x.device)
        if early_exit:  # those predicted as their target keep the x_adv just predicted
            moving = logits.detach().argmax(1) != target[active]
            if not bool(moving.any()):
                break
        loss = F.cross_entropy(logits[moving], target[active][moving], reduction="sum")
        (grad,) = torch.autograd.grad(loss, cur)
        grad_norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        with torch.no_grad():
            active, cur, grad, grad_norm = active[moving], cur[moving], grad[moving], grad_norm[moving]
            moved = cur - step_size * grad / grad_norm  # descend: targeted
            x_adv = x_adv.index_copy(0, active, (x[active] + _project_l2(moved - x[active], eps)).clamp(0.0, 1.0))
    return x_adv.detach()


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    return torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def random_targets(y: torch.Tensor, per_instance: int, num_classes: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """N_adv targets per instance, each != the instance's label, spread over the classes:
    a random offset then consecutive classes. Returns (source index, target class)."""
    n = len(y)
    index = torch.arange(n).repeat_interleave(per_instance)
    start = torch.randint(1, num_classes, (n,), generator=generator).repeat_interleave(per_instance)
    step = torch.arange(per_instance).repeat(n) % (num_classes - 1)
    offset = (start - 1 + step) % (num_classes - 1) + 1  # in 1..C-1, never 0
    return index, (y.cpu()[index] + offset) % num_classes


ATTACK_CHUNK_BYTES = 8 * 2**20  # pixels attacked at once: 512 rows up to 64 x 64 RGB, 13 at 224 x 224


def attack_chunk(x: torch.Tensor) -> int:
    """Rows attacked at once for inputs like x (n, C, H, W): up to 512, fewer where their pixels
    pass ATTACK_CHUNK_BYTES, since a backward pass keeps every layer's activations of the chunk
    (measured: ResNet-50 at 224 x 224, 80 rows at once, 8.0 GB peak resident). The examples do
    not depend on the chunking (the random start is drawn once, rows are independent in eval
    mode)."""
    return max(1, min(512, ATTACK_CHUNK_BYTES // max(1, x[0].nbytes)))


def adversarial_examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: UnlearnConfig, num_classes: int,
                         generator: torch.Generator, should_stop: Callable[[], bool] | None = None,
                         shard: Shard = ALONE) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A fragment's adversarial examples as its method configures them (the paper's D_adv, Eq. 1):
    `n_adv` targeted L2-PGD examples per instance of x (k, C, H, W) with labels y (k,), towards
    `random_targets`, in an eps-ball of `pgd_eps` (0: `pgd_eps_ratio` x the mean L2 norm of x),
    `pgd_steps` steps of `pgd_step_size` (0: 2.5 x eps / steps). Returns (the examples, their
    target classes, the attack's success rate); only the successful examples with
    `adv_only_successful`, none when the method uses no adversarial term. Raises Interrupted.
    `shard`: the rows split over a process group (`targeted_l2_pgd`)."""
    if not cfg.uses_adv or cfg.n_adv == 0:
        return x[:0], y[:0], 0.0
    eps = cfg.pgd_eps or cfg.pgd_eps_ratio * float(x.flatten(1).norm(dim=1).mean())
    step_size = cfg.pgd_step_size or 2.5 * eps / cfg.pgd_steps
    index, target = random_targets(y, cfg.n_adv, num_classes, generator)
    attacked = cpu_channels_last(model, x[:2]) if cfg.fast_path else model
    result = targeted_l2_pgd(attacked, x[index.to(x.device)], target.to(x.device), eps=eps, step_size=step_size,
                             steps=cfg.pgd_steps, generator=generator, should_stop=should_stop,
                             early_exit=cfg.pgd_early_exit, chunk_size=attack_chunk(x), shard=shard)
    keep = result.success if cfg.adv_only_successful else torch.ones_like(result.success)
    return result.x[keep], result.target[keep], result.success_rate
