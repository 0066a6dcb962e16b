"""The frozen prefix of a network: the layers before the first one unlearning moves.

While a fragment runs in eval mode, the prefix's output for a fixed input never changes, so
the engine computes it once per fragment (for the objective, the adversarial examples, the
distillation pool, the retain buffer) and runs only the trainable suffix per step. Two ways to
split (`plan_split`): an eager `nn.Sequential` (forward not overridden) at a top-level child; any
other network whose graph torch.fx can trace (as torchvision's feature extraction does: ResNets,
MobileNets, EfficientNets, ViTs, a user's own forward; shape checks are resolved on a meta copy of
an input) or that already is a graph (a torch.export program's module) at the one activation
through which every trainable operation sees the input. A traced split is kept only when it
computes the model's logits on real input rows. Otherwise (TorchScript, a forward that cannot be
traced, two activations crossing the cut) the engine runs the whole model, and says why.
"""
from __future__ import annotations

import copy
from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import fx, nn

from .models import Normalized
from .traced import TRACED, center_taps, not_eager, split_graph, trace

__all__ = ["FrozenPrefix", "cpu_channels_last", "frozen_prefix_length", "plan_split", "rows_independent",
           "split_frozen_prefix"]

def frozen_prefix_length(net: nn.Module, trainable: Collection[str]) -> int | None:
    """How many leading top-level children of `net` hold no parameter named in `trainable`
    (names as `net.named_parameters()` gives them); None when `net` cannot be split there (not
    an eager nn.Sequential, or one whose forward is its own)."""
    if (not isinstance(net, nn.Sequential) or not_eager(net) or isinstance(net, fx.GraphModule)
            or type(net).forward is not nn.Sequential.forward):
        return None
    chosen = set(trainable)
    for i, (name, child) in enumerate(net.named_children()):
        if any(f"{name}.{p}" in chosen for p, _ in child.named_parameters()):
            return i
    return len(net)


@dataclass(frozen=True)
class FrozenPrefix:
    """model(x) == suffix(prefix(x)); `prefix` holds no trainable parameter."""

    prefix: nn.Module  # pixels in [0, 1] -> features (normalisation included)
    suffix: nn.Module  # features -> logits
    cut: str  # where: "child 5 of the Sequential", or the traced activation's node name
    path: str = "sequential"  # sequential | traced

    @torch.no_grad()
    def features(self, x: torch.Tensor, chunk: int = 128) -> torch.Tensor:
        """(N, ...) prefix output, without gradients, in the default (contiguous) layout whatever
        the prefix's, so the suffix sees what the whole model would. x: (N, C, H, W). Computed
        `chunk` images at a time when the prefix's rows are independent (`rows_independent`):
        measured on the MNIST-5k CNN (2,048 images, 2 threads, channels-last), 128 keeps a chunk's
        activations in cache: 0.16 s, 0.30 s with 512, 0.37 s in one batch."""
        if len(x) > chunk and rows_independent(self.prefix):
            return torch.cat([self.prefix(c).contiguous() for c in x.split(chunk)])
        return self.prefix(x).contiguous()


def split_frozen_prefix(model: nn.Module, trainable: Collection[str],
                        example: torch.Tensor | None = None) -> FrozenPrefix | None:
    """`plan_split(...)[0]`: the split, or None (run the whole model)."""
    return plan_split(model, trainable, example)[0]


def plan_split(model: nn.Module, trainable: Collection[str],
               example: torch.Tensor | None = None) -> tuple[FrozenPrefix | None, str]:
    """(the split of `model` -- the user's network, or it inside `Normalized` -- before its first
    trainable operation, or None; a line for the log saying which path it took and why).
    `trainable`: parameter names of the user's network. `example`: (n >= 2, C, H, W) real input
    rows, needed to trace a network that is not a plain Sequential (the split is checked on them
    in the network's current mode: rtol 1e-4, atol 1e-5, the input of the suffix left as it was).
    None when nothing can be cached (the first operation already moves) or the network cannot be
    split."""
    net = model.net if isinstance(model, Normalized) else model
    length = frozen_prefix_length(net, trainable)
    if length is not None:
        if not length:
            return None, "whole model: its first layer moves"
        children = list(net.children())
        return FrozenPrefix(_normalized(model, nn.Sequential(*children[:length])), nn.Sequential(*children[length:]),
                            f"child {length} of the Sequential"), f"sequential: frozen prefix of {length} children"
    if isinstance(net, torch.jit.ScriptModule):
        return None, "whole model: TorchScript is not split"
    if example is None or len(example) < 2:
        return None, "whole model: no input rows to trace it with"
    graph, why = trace(net, example)
    if graph is None:
        return None, why
    split, why = split_graph(graph, set(trainable))
    if split is None:
        return None, why
    prefix, suffix = split
    split = FrozenPrefix(_normalized(model, prefix), suffix, why, "traced")
    if getattr(suffix, TRACED, False):
        center_taps(suffix, split.prefix, example)
    why = _check(model, split, net, trainable, example)
    return (split, f"traced: frozen prefix up to {split.cut}") if why is None else (None, why)


def _normalized(model: nn.Module, head: nn.Module) -> nn.Module:
    return _NormalizedPrefix(head, model.mean, model.std) if isinstance(model, Normalized) else head


def _check(model: nn.Module, split: FrozenPrefix, net: nn.Module, trainable: Collection[str],
           example: torch.Tensor) -> str | None:
    """None when the split computes the model's logits on `example` and the same gradients for the
    model's own trainable parameters, which the prefix does not hold (a tied weight, a no_grad
    block torch.fx does not record); else why not. A part whose rows are not independent on
    `example` (a statistic over the batch in a functional call) is marked so (`rows_independent`)."""
    own = dict(net.named_parameters())
    params = [own[n] for n in trainable]
    if not {id(p) for p in params} <= {id(p) for p in split.suffix.parameters()}:
        return "whole model: the traced suffix does not hold the trainable parameters"
    if {id(p) for p in params} & {id(p) for p in split.prefix.parameters()}:
        return "whole model: a trainable parameter is used before the cut"
    flags = [p.requires_grad for p in params]
    try:
        with torch.no_grad():
            features = split.prefix(example)
            before = features.clone()
            alone = [split.prefix(row[None]) for row in example], [split.suffix(f[None]) for f in features]
        with torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            out = split.suffix(features)
            weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out.device)
            mine = torch.autograd.grad((out * weights).sum(), params, allow_unused=True)
            whole = model(example)
            theirs = torch.autograd.grad((whole * weights).sum(), params, allow_unused=True)
    except Exception as e:
        return f"whole model: the traced split fails on real rows ({type(e).__name__})"
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    if not torch.allclose(out.detach(), whole.detach(), rtol=1e-4, atol=1e-5):
        return "whole model: the traced split computes other logits"
    if not all((a is None) == (b is None) and (a is None or torch.allclose(a, b, rtol=1e-3, atol=1e-5))
               for a, b in zip(mine, theirs)):
        return "whole model: the traced split gives other gradients"
    if not torch.equal(features, before):
        return "whole model: the suffix writes into its input"
    for part, rows, batch in ((split.prefix, alone[0], features), (split.suffix, alone[1], out.detach())):
        if not torch.allclose(torch.cat(rows), batch, rtol=1e-4, atol=1e-5):
            for m in part.modules():  # its rows mix: never chunked, merged or copied to channels-last
                if isinstance(m, torch.fx.GraphModule):
                    setattr(m, TRACED, False)
    return None


class _NormalizedPrefix(nn.Module):
    """Normalized's (x - mean) / std, then the first layers: the same arithmetic as the model's."""

    def __init__(self, head: nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.head = head
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((x - self.mean) / self.std)


def rows_independent(module: nn.Module) -> bool:
    """True when, in eval mode, each input row's output depends on that row only, so rows may be
    batched and chunked freely: an eager module without BatchNorm that normalises by the batch
    (`track_running_stats=False`). TorchScript and torch.export modules (whose batch sizes may be
    bounded) are not batched beyond what the caller gives them."""
    return not any(not_eager(m)
                   or (isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None)
                   for m in module.modules())


def cpu_channels_last(module: nn.Module, example: torch.Tensor) -> nn.Module:
    """A channels-last copy of an eager CPU module that has 4-D (convolution) weights, for
    fixed-weight passes (the attack, the frozen prefix, evaluation): the same values, another
    memory layout, so the same arithmetic up to summation order. Measured on the MNIST-5k CNN, 2
    threads: the prefix of 2,048 images in 0.16 s instead of 0.31 s, the attack 1.27x faster
    (max-pooling with indices is the gain), 1,000-image evaluation 3.5x.

    The copy is tried on `example` (a few input rows, (n, C, H, W)) next to the module, in eval
    mode, and kept only if it runs and gives the same output (rtol 1e-4, atol 1e-5): a forward
    that `.view`s its activations, for one, fails on channels-last tensors. `module` itself on
    other devices (not measured there), for TorchScript or torch.export modules, with forward
    hooks (a copy would call them with its own modules), without 4-D weights, and whenever the
    copy cannot be made or differs."""
    params = list(module.parameters())
    if (not params or params[0].device.type != "cpu" or not any(p.dim() == 4 for p in params)
            or any(not_eager(m) or m._forward_hooks
                   or m._forward_pre_hooks for m in module.modules())):
        return module
    was_training = module.training
    try:  # a layout is only a speed-up: anything that goes wrong leaves the module as it is
        copy_ = copy.deepcopy(module).to(memory_format=torch.channels_last).eval()
        module.eval()
        with torch.no_grad():
            same = torch.allclose(copy_(example), module(example), rtol=1e-4, atol=1e-5)
        return copy_ if same else module
    except Exception:
        return module
    finally:
        module.train(was_training)
