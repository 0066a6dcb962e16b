"""Which parameters unlearning moves: the classifier head, the last block and the head,
everything, or the user's globs.

Names are `named_parameters()` names of the module given (the user's network, not the
`Normalized` wrapper), so `unlearning.trainable: ["fc.*"]` reads as the user's own code does.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Collection, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["PRESETS", "describe_trainable", "head_parameter_names", "last_block_parameter_names", "select_trainable"]

PRESETS = ("auto", "head", "block", "all")
# auto: the head alone when it holds at least this share of the parameters (a hidden Linear layer,
# as in the MNIST CNN), else the last block too (a one-Linear head, as in ResNets). Measured
# (benchmarks/forgetting_attacks.py, Fashion ResNet, k=64, seed 0): head alone (1,290 of 303,866
# parameters) missed the misclassify goal after 1,000 steps at -18 points of test accuracy; the
# last block + head reached it in 135 steps (unseen: 102 steps, -0.7 points).
AUTO_HEAD_SHARE = 0.1
_SHOWN = 3


def head_parameter_names(net: nn.Module) -> list[str]:
    """Parameters of the classifier head: the trailing run of Linear-layer parameters in
    `named_parameters` order (the Linear layers after the last other layer holding parameters:
    a CNN's classifier, a ResNet's fc, a ViT's heads -- not the Linear layers inside its encoder);
    every Linear layer's when no parameter of one comes last. A Linear layer is an nn.Linear, a
    scripted submodule whose original_name is Linear, or a weight/bias fed to aten.linear in an
    exported graph (whose submodules are plain nn.Module placeholders)."""
    linear: set[str] = set()
    for prefix, module in net.named_modules():
        own: list[str] = []
        if isinstance(module, nn.Linear) or (
                isinstance(module, torch.jit.ScriptModule) and getattr(module, "original_name", None) == "Linear"):
            own = [name for name, _ in module.named_parameters(recurse=False)]
        elif isinstance(module, torch.fx.GraphModule):
            own = [arg.target for node in module.graph.nodes
                   if node.op == "call_function" and node.target is torch.ops.aten.linear.default
                   for arg in node.args[1:3] if isinstance(arg, torch.fx.Node) and arg.op == "get_attr"]
        linear.update(f"{prefix}.{name}" if prefix else name for name in own)
    names = [name for name, _ in net.named_parameters()]
    trailing = len(names)
    while trailing and names[trailing - 1] in linear:
        trailing -= 1
    return names[trailing:] or [name for name in names if name in linear]


def last_block_parameter_names(net: nn.Module) -> list[str]:
    """Parameters of the last block before the head: the last child holding parameters outside
    the head (`head_parameter_names`), descending into it while it holds more than half of the
    non-head parameters and is a container (Sequential, ModuleList, ModuleDict: a stage of blocks)
    or a wrapper (one of its children holds more than half: a user's module around the whole
    network, a ViT's encoder). Children whose parameters are all normalisation layers' (a ViT's
    final LayerNorm) are passed over on the way and join the block. `layer3` of the Fashion
    ResNet, `layer4.1` of a torchvision ResNet, `features.16` of MobileNetV3, the last encoder
    layer and `encoder.ln` of a ViT, the last convolution of a Sequential CNN. [] when every
    parameter is in the head."""
    head = set(head_parameter_names(net))
    sizes = {name: p.numel() for name, p in net.named_parameters()}
    total = sum(n for name, n in sizes.items() if name not in head)
    module, prefix, passed = net, "", []
    while True:
        chosen = None
        for child, sub in reversed(list(module.named_children())):
            names = [f"{prefix}{child}.{name}" for name, _ in sub.named_parameters()]
            if not any(name not in head for name in names):
                continue
            if _normalisation_only(sub, f"{prefix}{child}.", head):
                passed += [n for n in names if n not in head]
                continue
            chosen = (child, sub, names)
            break
        if chosen is None:
            return passed
        child, sub, names = chosen
        own = sum(sizes.get(n, 0) for n in names if n not in head)  # a tied alias counts once, by its first name
        if not (own > total / 2 and (_is_container(sub) or any(
                sum(sizes.get(f"{prefix}{child}.{c}.{n}", 0) for n, _ in grand.named_parameters()
                    if f"{prefix}{child}.{c}.{n}" not in head) > total / 2 for c, grand in sub.named_children()))):
            return names + passed  # a block (its children share it), not a stage or a wrapper
        module, prefix = sub, f"{prefix}{child}."


def _normalisation_only(module: nn.Module, prefix: str, head: set[str]) -> bool:
    """Every layer of `module` (named from `prefix`) holding a parameter outside the head is a
    normalisation layer (a ViT's final LayerNorm; ConvNeXt's classifier: LayerNorm2d + the head)."""
    norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
    owners = [m for name, m in module.named_modules()
              if any(f"{prefix}{name + '.' if name else ''}{p}" not in head for p, _ in m.named_parameters(recurse=False))]
    return bool(owners) and all(isinstance(m, norms) for m in owners)


def _is_container(module: nn.Module) -> bool:
    kinds = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    return isinstance(module, kinds) or getattr(module, "original_name", None) in {k.__name__ for k in kinds}


def select_trainable(net: nn.Module, spec: str | Sequence[str]) -> list[str]:
    """Names of the parameters unlearning moves, among those with requires_grad, in
    `named_parameters` order: "all"; "head" (the Linear layers; all when there is none);
    "block" (the head and the last block before it, `last_block_parameter_names`); "auto"
    ("head" when it holds >= AUTO_HEAD_SHARE of the parameters, else "block"); or fnmatch
    globs such as ["layer4.*", "fc.*"]. Raises ConfigError for a glob that matches nothing
    (naming it and a few real names) or a spec of another kind."""
    free = [name for name, p in net.named_parameters() if p.requires_grad]
    if spec == "all":
        return free
    if spec == "auto":
        sizes = dict((name, p.numel()) for name, p in net.named_parameters())
        head = [name for name in head_parameter_names(net) if name in free]
        share = sum(sizes[n] for n in head) / max(1, sum(sizes[n] for n in free))
        spec = "head" if share >= AUTO_HEAD_SHARE else "block"
    if spec in ("head", "block"):
        chosen = set(head_parameter_names(net))
        if spec == "block":
            chosen |= set(last_block_parameter_names(net))
        return [name for name in free if name in chosen] or free
    if isinstance(spec, str) or not spec:
        raise ConfigError(f"unlearning.trainable {spec!r}: expected 'auto', 'head', 'block', 'all' or a list of "
                          "parameter-name globs such as ['fc.*']")
    for pattern in spec:
        if not fnmatch.filter(free, pattern):
            raise ConfigError(f"unlearning.trainable glob {pattern!r} matches no trainable parameter of "
                              f"{type(net).__name__}; names look like {_few(free)}")
    return [name for name in free if any(fnmatch.fnmatchcase(name, pattern) for pattern in spec)]


def describe_trainable(net: nn.Module, names: Collection[str]) -> dict[str, Any]:
    """Counts for the start-up log line: elements chosen, in all, tensors chosen, and elements
    chosen per top-level module, e.g. {"trainable_parameters": 5130, "total_parameters":
    11181642, "trainable_tensors": 2, "by_module": {"fc": 5130}}. Raises ValueError for a name
    that is not a parameter of `net`."""
    sizes = {name: p.numel() for name, p in net.named_parameters()}
    unknown = [name for name in names if name not in sizes]
    if unknown:
        raise ValueError(f"not parameters of {type(net).__name__}: {_few(unknown)}")
    by_module: dict[str, int] = {}
    for name in names:
        top = name.split(".", 1)[0]
        by_module[top] = by_module.get(top, 0) + sizes[name]
    return {"trainable_parameters": sum(by_module.values()), "total_parameters": sum(sizes.values()),
            "trainable_tensors": len(names), "by_module": by_module}


def _few(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "") if names else "none"
