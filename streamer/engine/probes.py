"""Linear probes on a classifier's internal features: can its features still tell the forgotten
instances' labels, whatever the head now says? (Illusion of Unlearning, AISTATS 2026: linear probes
recover labels that classifier-only unlearning hides.)

Two feature sets, both caught with forward hooks on `nn.Linear` layers of the classifier head:

    penultimate   the input of the head's last Linear (what the final layer reads)
    prehead       the input of the head's first Linear (what the whole head reads: for the MNIST
                  CNN's `Flatten, Linear, ReLU, Linear` the flattened convolutional features)

The head is the last Linear a forward pass runs and the Linear layers run before it that reach it
through activations, dropout, identities or BatchNorm1d only; a flatten, pooling, convolution or any
other layer ends it. For a one-Linear head (torchvision ResNets, `models.fashion_resnet`) pre-head
and penultimate features are the same tensor, and one probe stands for both.

Shapes: x (N, C, H, W); features (N, D) float32 on the CPU (a Linear's input flattened from dim 1).
Pure: no I/O; models are not modified (hooks are removed, even on an exception).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from .evaluate import logits as predict_logits

FEATURES = ("penultimate", "prehead")
_JOINING_MODULES = ("torch.nn.modules.activation", "torch.nn.modules.dropout")

__all__ = ["FEATURES", "Head", "classifier_head", "head_features", "penultimate_features", "prehead_features",
           "probe_recovery", "probe_recoveries"]


@dataclass(frozen=True)
class Head:
    """The classifier head's Linear layers in the order they run, as (module name, module)."""

    layers: tuple[tuple[str, nn.Linear], ...]

    @property
    def single(self) -> bool:
        """One Linear: pre-head features are the penultimate features."""
        return len(self.layers) == 1

    def describe(self) -> str:
        """e.g. "pre-head = input of net.7 (3136 features), penultimate = input of net.9 (128 features)"."""
        (first, f), (last, l) = self.layers[0], self.layers[-1]
        if self.single:
            return (f"the head is one Linear layer ({last}), so pre-head = penultimate = its input "
                    f"({l.in_features} features): one probe, reported under both")
        return (f"pre-head = input of {first} ({f.in_features} features), penultimate = input of {last} "
                f"({l.in_features} features)")


def _joins_head(module: nn.Module) -> bool:
    """A layer that can stand between two Linear layers of one head."""
    if isinstance(module, (nn.Identity, nn.BatchNorm1d)):
        return True
    return type(module).__module__ in _JOINING_MODULES and not any(True for _ in module.parameters())


def classifier_head(model: nn.Module, x: torch.Tensor) -> Head | None:
    """The head of `model` (see the module docstring), found by running x[:2] with a forward hook
    on every leaf module; None when no eager nn.Linear runs (TorchScript or exported networks,
    whose layers hooks cannot see). x: (N >= 1, C, H, W)."""
    order: list[tuple[str, nn.Module]] = []
    handles = [m.register_forward_hook(lambda mod, _in, _out, name=name: order.append((name, mod)))
               for name, m in model.named_modules()
               if next(m.children(), None) is None and not isinstance(m, torch.jit.ScriptModule)]
    try:
        predict_logits(model, x[:2])
    finally:
        for handle in handles:
            handle.remove()
    last = max((i for i, (_, m) in enumerate(order) if isinstance(m, nn.Linear)), default=None)
    if last is None:
        return None
    layers = [order[last]]
    for name, module in reversed(order[:last]):
        if isinstance(module, nn.Linear):
            layers.insert(0, (name, module))
        elif not _joins_head(module):
            break
    return Head(tuple(layers))


def head_features(model: nn.Module, x: torch.Tensor, head: Head | None = None,
                  batch_size: int = 512) -> dict[str, torch.Tensor] | None:
    """{"penultimate": (N, D_last), "prehead": (N, D_first)} from one pass over x; the same tensor
    under both keys for a one-Linear head. `head` defaults to `classifier_head(model, x)`. None
    when the network has no hookable Linear."""
    head = classifier_head(model, x) if head is None else head
    if head is None:
        return None
    layers = {"prehead": head.layers[0][1], "penultimate": head.layers[-1][1]}
    caught: dict[int, list[torch.Tensor]] = {id(layer): [] for layer in layers.values()}
    handles = [layer.register_forward_hook(
        lambda m, inputs, _out: caught[id(m)].append(inputs[0].flatten(1).float().cpu()))
        for layer in {id(v): v for v in layers.values()}.values()]
    try:
        predict_logits(model, x, batch_size)
    finally:
        for handle in handles:
            handle.remove()
    joined = {key: torch.cat(parts) for key, parts in caught.items()}
    return {kind: joined[id(layer)] for kind, layer in layers.items()}


def penultimate_features(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor | None:
    """(N, D) inputs of the head's last `nn.Linear`; None without an eager Linear to hook."""
    features = head_features(model, x, batch_size=batch_size)
    return None if features is None else features["penultimate"]


def prehead_features(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor | None:
    """(N, D) inputs of the head's first `nn.Linear`; None without an eager Linear to hook."""
    features = head_features(model, x, batch_size=batch_size)
    return None if features is None else features["prehead"]


def probe_recoveries(model: nn.Module, forgotten_x: torch.Tensor, forgotten_y: torch.Tensor, held_out_x: torch.Tensor,
                     held_out_y: torch.Tensor, seed: int = 0,
                     kinds: tuple[str, ...] = FEATURES) -> dict[str, float | None]:
    """{"penultimate": acc, "prehead": acc}, the `kinds` asked for. Each is the accuracy on the
    forgotten instances' training labels (F,) of a logistic-regression probe (standardised
    features, sklearn LogisticRegression, `random_state=seed`) fitted on the held-out instances'
    features and labels (H,) (Illusion of Unlearning, AISTATS 2026). A one-Linear head fits one probe and
    reports it under both keys. None values without a hookable Linear. Raises KeyError for an
    unknown kind, ValueError (sklearn) when the held-out labels hold a single class."""
    unknown = [kind for kind in kinds if kind not in FEATURES]
    if unknown:
        raise KeyError(f"probe features {unknown}: expected some of {FEATURES}")
    head = classifier_head(model, held_out_x)
    train = head_features(model, held_out_x, head)
    test = head_features(model, forgotten_x, head)
    if train is None or test is None:
        return dict.fromkeys(kinds)
    scores: dict[int, float] = {}
    for kind in kinds:
        if id(train[kind]) not in scores:
            probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
            probe.fit(train[kind].numpy(), held_out_y.cpu().numpy())
            scores[id(train[kind])] = float((probe.predict(test[kind].numpy()) == forgotten_y.cpu().numpy()).mean())
    return {kind: scores[id(train[kind])] for kind in kinds}


def probe_recovery(model: nn.Module, forgotten_x: torch.Tensor, forgotten_y: torch.Tensor, held_out_x: torch.Tensor,
                   held_out_y: torch.Tensor, seed: int = 0, features: str = "penultimate") -> float | None:
    """`probe_recoveries` for one feature set ("penultimate" or "prehead"; KeyError otherwise)."""
    return probe_recoveries(model, forgotten_x, forgotten_y, held_out_x, held_out_y, seed, (features,))[features]
