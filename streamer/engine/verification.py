"""Attacks on forgetting: does a model still hold what it was asked to forget?

Pure: models and tensors in, an `AttackReport` out; no I/O. Every metric is computed on the
model under test and, on the same inputs, on a reference model (the original, or one retrained
without the forgotten instances), so each number is read against the reference's.

    probe recovery      linear probes on penultimate and pre-head features (`probes`;
                        Illusion of Unlearning, AISTATS 2026)
    relearning          accuracy after a short fine-tune on held-out data (NeurIPS 2025)
    MIA-efficacy        SalUn's SVC on true-class confidence (Fan et al., ICLR 2024)
    loss-threshold AUC  Yeom et al., CSF 2018
    Streisand AUC       forgotten vs held-out from output statistics (ReGUn, Twin Machine
                        Unlearning, 2025-26)

Shapes: forgotten x (F, C, H, W) in [0, 1], y (F,) the training labels; held-out x (H, C, H, W),
y (H,); optional retained training data x (R, C, H, W), y (R,). Deterministic for a given seed
(CPU; sklearn with `random_state=seed`, sampling with a seeded torch.Generator).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from torch import nn

from .evaluate import accuracy
from .evaluate import logits as predict_logits
from .formats import clone_module
from .models import grad_only
from .probes import classifier_head, penultimate_features, prehead_features, probe_recoveries, probe_recovery

__all__ = ["RELEARN_SAMPLES", "RELEARN_STEPS", "AttackReport", "Pair", "attack_report", "loss_threshold_auc",
           "mia_efficacy", "output_statistics", "penultimate_features", "prehead_features", "probe_recovery",
           "relearn_accuracy", "streisand_auc", "true_class_confidence"]

RELEARN_STEPS = (5, 20, 50)
RELEARN_SAMPLES = 256


@dataclass(frozen=True)
class Pair:
    """One metric on the model under test and on the reference, same inputs."""

    model: float | None
    reference: float | None


@dataclass(frozen=True)
class AttackReport:
    forgotten: int  # F
    held_out: int  # H
    forget_accuracy: Pair  # training-label accuracy on the forgotten instances, before any attack
    probe_recovery: Pair  # penultimate features; None where the network has no hookable Linear (exported)
    probe_recovery_prehead: Pair  # pre-head features; = probe_recovery for a one-Linear head (see notes)
    relearn: dict[int, Pair]  # steps -> training-label accuracy on the forgotten instances after fine-tuning
    mia_efficacy: Pair
    loss_auc: Pair
    streisand_auc: Pair
    mia_members: str  # what the MIA's member class was
    notes: tuple[str, ...] = ()
    relearn_samples: int = 0  # held-out instances the relearning copies are fine-tuned on

    def to_json(self) -> dict:
        data = asdict(self)
        data["relearn"] = {str(k): asdict(v) for k, v in self.relearn.items()}
        data["notes"] = list(self.notes)
        return data

    def summary(self) -> dict[str, dict[str, float | None]]:
        """The main numbers, {name: {"model": v, "reference": v}}: forget accuracy, both probes,
        relearning at the most steps run (`relearn_<steps>`), MIA-efficacy, loss and Streisand AUC."""
        pairs = {"forget_accuracy": self.forget_accuracy, "probe_recovery": self.probe_recovery,
                 "probe_recovery_prehead": self.probe_recovery_prehead}
        if self.relearn:
            most = max(self.relearn)
            pairs[f"relearn_{most}"] = self.relearn[most]
        pairs.update(mia_efficacy=self.mia_efficacy, loss_auc=self.loss_auc, streisand_auc=self.streisand_auc)
        return {name: asdict(pair) for name, pair in pairs.items()}


def attack_report(model: nn.Module, reference: nn.Module, forgotten_x: torch.Tensor, forgotten_y: torch.Tensor,
                  held_out_x: torch.Tensor, held_out_y: torch.Tensor, retained_x: torch.Tensor | None = None,
                  retained_y: torch.Tensor | None = None, seed: int = 0, relearn_steps: tuple[int, ...] = RELEARN_STEPS,
                  relearn_samples: int = RELEARN_SAMPLES, relearn_lr: float = 1e-3,
                  shadow: nn.Module | None = None) -> AttackReport:
    """Every attack below on `model` and on `reference` (shapes: see the module docstring).

    Without retained training data the MIA's shadow model is `shadow`, a model trained on the
    forgotten instances: by default the reference, which is right when the reference is the
    original; pass the original as `shadow` when the reference was retrained without them. Needs at
    least 2 forgotten and 4 held-out instances (cross-validation folds); raises ValueError
    otherwise. Models are not modified."""
    if len(forgotten_y) < 2 or len(held_out_y) < 4:
        raise ValueError(f"attacks need >= 2 forgotten and >= 4 held-out instances, got {len(forgotten_y)} "
                         f"and {len(held_out_y)}")
    notes: list[str] = []
    shadow = reference if shadow is None else shadow
    if retained_x is None:
        which = ("the reference model" if shadow is reference
                 else "a separate model trained on them (streamer verify: the original, v000000)")
        notes.append(f"MIA: no retained training data given; the shadow is {which} (members: the forgotten "
                     "instances it was trained on, non-members: held-out), cross-fitted in 2 folds")

    def both(fn):
        return Pair(fn(model), fn(reference))

    probes = both(lambda m: probe_recoveries(m, forgotten_x, forgotten_y, held_out_x, held_out_y, seed))
    notes += _probe_notes(model, reference, held_out_x)
    relearn_m = relearn_accuracy(model, forgotten_x, forgotten_y, held_out_x, held_out_y, relearn_steps,
                                 relearn_samples, relearn_lr, seed)
    relearn_r = relearn_accuracy(reference, forgotten_x, forgotten_y, held_out_x, held_out_y, relearn_steps,
                                 relearn_samples, relearn_lr, seed)
    return AttackReport(
        forgotten=len(forgotten_y), held_out=len(held_out_y),
        forget_accuracy=both(lambda m: accuracy(m, forgotten_x, forgotten_y)),
        probe_recovery=Pair(probes.model["penultimate"], probes.reference["penultimate"]),
        probe_recovery_prehead=Pair(probes.model["prehead"], probes.reference["prehead"]),
        relearn={s: Pair(relearn_m[s], relearn_r[s]) for s in relearn_steps},
        mia_efficacy=_mia_pair(model, reference, shadow, forgotten_x, forgotten_y, held_out_x, held_out_y,
                               retained_x, retained_y, seed),
        loss_auc=both(lambda m: loss_threshold_auc(m, forgotten_x, forgotten_y, held_out_x, held_out_y)),
        streisand_auc=both(lambda m: streisand_auc(m, forgotten_x, forgotten_y, held_out_x, held_out_y, seed)),
        mia_members="retained training data" if retained_x is not None else
        f"forgotten instances under the {'reference' if shadow is reference else 'shadow'} model",
        notes=tuple(notes), relearn_samples=min(relearn_samples, len(held_out_y)),
    )


def _probe_notes(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> list[str]:
    """Which features the probes read, once when model and reference agree."""
    said = {}
    for who, net in (("model", model), ("reference", reference)):
        head = classifier_head(net, x)
        said[who] = (head.describe() if head is not None else
                     "the network has no Linear layer a forward hook can see (TorchScript or exported): no probe")
    if said["model"] == said["reference"]:
        return [f"probe: {said['model']}"]
    return [f"probe ({who}): {text}" for who, text in said.items()]


# --- relearning -----------------------------------------------------------------------------------

def relearn_accuracy(model: nn.Module, forgotten_x: torch.Tensor, forgotten_y: torch.Tensor, held_out_x: torch.Tensor,
                     held_out_y: torch.Tensor, steps: tuple[int, ...] = RELEARN_STEPS, samples: int = RELEARN_SAMPLES,
                     lr: float = 1e-3, seed: int = 0, batch_size: int = 64) -> dict[int, float]:
    """{steps: training-label accuracy on the forgotten instances} after fine-tuning a copy of
    `model` (every parameter, Adam at `lr`, eval mode: BatchNorm statistics and dropout frozen)
    on a seeded sample of `samples` held-out instances, minibatches of `batch_size`
    (relearning attacks, NeurIPS 2025: a short fine-tune on other data brings forgotten instances
    back unless the knowledge is gone). One run, read at each step count; `model` is untouched."""
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(held_out_y), generator=gen)[:samples]
    sample_x, sample_y = held_out_x[pick], held_out_y[pick]
    work = clone_module(model)
    device = next(work.parameters()).device
    params = [p for p in work.parameters() if p.is_floating_point()]
    optimizer = torch.optim.Adam(params, lr=lr)
    result: dict[int, float] = {}
    with grad_only(work, params, train=False):
        for step in range(1, max(steps, default=0) + 1):
            batch = torch.randint(len(sample_y), (min(batch_size, len(sample_y)),), generator=gen)
            loss = F.cross_entropy(work(sample_x[batch].to(device)), sample_y[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step in steps:
                result[step] = accuracy(work, forgotten_x, forgotten_y)
    return result


# --- membership inference -------------------------------------------------------------------------

def true_class_confidence(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """(N, 1) softmax probability of the given class (SalUn's MIA feature)."""
    probs = torch.softmax(predict_logits(model, x), 1)
    return probs.gather(1, y.cpu().view(-1, 1)).numpy()


def mia_efficacy(member_conf: np.ndarray, non_member_conf: np.ndarray, target_conf: np.ndarray) -> float:
    """Fraction of the target instances an RBF SVC (C=3, gamma='auto') fitted on true-class
    confidence, members = 1 vs non-members = 0, predicts non-member: SalUn's MIA-efficacy (Fan et
    al., ICLR 2024, `SVC_MIA`, after Song & Mittal 2021). Higher = looks less like a member; the
    member and non-member sets are balanced to the smaller's size, as SalUn does."""
    n = min(len(member_conf), len(non_member_conf))
    features = np.concatenate([member_conf[:n], non_member_conf[:n]])
    labels = np.concatenate([np.ones(n), np.zeros(n)])
    clf = SVC(C=3, gamma="auto", kernel="rbf").fit(features, labels)
    return float(1.0 - clf.predict(target_conf).mean())


def _mia_pair(model, reference, shadow, forgotten_x, forgotten_y, held_out_x, held_out_y, retained_x, retained_y,
              seed: int) -> Pair:
    """Shadow: retained (member) vs held-out (non-member), scored by the same model as the target.
    Without retained data `shadow` is the shadow model: members = the forgotten instances as the
    shadow scores them (it was trained on them), non-members = held-out, fitted on one
    half of the forgotten set and applied to the other half (2 folds), so no target is scored by
    a classifier fitted on it."""
    if retained_x is not None:
        def one(m):
            return mia_efficacy(true_class_confidence(m, retained_x, retained_y),
                                true_class_confidence(m, held_out_x, held_out_y),
                                true_class_confidence(m, forgotten_x, forgotten_y))
        return Pair(one(model), one(reference))
    member = true_class_confidence(shadow, forgotten_x, forgotten_y)
    non_member = true_class_confidence(shadow, held_out_x, held_out_y)
    halves = np.array_split(np.random.default_rng(seed).permutation(len(forgotten_y)), 2)
    values = {}
    for m in (model, reference):
        target = true_class_confidence(m, forgotten_x, forgotten_y)
        values[id(m)] = sum(mia_efficacy(member[fit], non_member, target[apply]) * len(apply)
                            for fit, apply in ((halves[0], halves[1]), (halves[1], halves[0]))) / len(forgotten_y)
    return Pair(values[id(model)], values[id(reference)])


def loss_threshold_auc(model: nn.Module, forgotten_x: torch.Tensor, forgotten_y: torch.Tensor,
                       held_out_x: torch.Tensor, held_out_y: torch.Tensor) -> float:
    """ROC AUC of the score -loss for forgotten (positive) vs held-out (negative): the
    loss-threshold membership attack of Yeom et al., CSF 2018, over every threshold. 0.5: the
    forgotten instances look held out; 1: they look like training data; near 0: they have an
    unusually high loss (the Streisand signature)."""
    losses = [F.cross_entropy(predict_logits(model, x), y.cpu(), reduction="none").numpy()
              for x, y in ((forgotten_x, forgotten_y), (held_out_x, held_out_y))]
    labels = np.concatenate([np.ones(len(losses[0])), np.zeros(len(losses[1]))])
    return float(roc_auc_score(labels, -np.nan_to_num(np.concatenate(losses), nan=1e6, posinf=1e6)))


def output_statistics(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """(N, K + 2): the softmax sorted in decreasing order, its entropy, and the cross-entropy loss
    on y (clipped at 50; a non-finite row reads as the clip value)."""
    out = predict_logits(model, x)
    probs = torch.softmax(out, 1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(1, keepdim=True)
    loss = F.cross_entropy(out, y.cpu(), reduction="none").clamp(max=50.0).unsqueeze(1)
    stats = torch.cat([probs.sort(1, descending=True).values, entropy, loss], 1).numpy()
    return np.nan_to_num(stats, nan=50.0, posinf=50.0, neginf=0.0)


def streisand_auc(model: nn.Module, forgotten_x: torch.Tensor, forgotten_y: torch.Tensor, held_out_x: torch.Tensor,
                  held_out_y: torch.Tensor, seed: int = 0, folds: int = 5) -> float:
    """Out-of-fold ROC AUC of a logistic regression telling forgotten from held-out instances by
    `output_statistics` (stratified `folds`-fold cross-validation; the Streisand effect of
    unlearning, as measured in ReGUn and Twin Machine Unlearning, 2025-26). 0.5: forgotten
    instances are indistinguishable from data the model never saw, which is what a retrained
    model gives; near 1: forgetting left a detectable signature."""
    features = np.concatenate([output_statistics(model, forgotten_x, forgotten_y),
                               output_statistics(model, held_out_x, held_out_y)])
    labels = np.concatenate([np.ones(len(forgotten_y)), np.zeros(len(held_out_y))])
    folds = max(2, min(folds, len(forgotten_y), len(held_out_y)))
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced",
                                                             random_state=seed))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = cross_val_predict(clf, features, labels, cv=cv, method="predict_proba")[:, 1]
    return float(roc_auc_score(labels, scores))

