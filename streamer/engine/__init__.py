"""The unlearning engine: pure tensor code, no Kafka, disk or HTTP.

Public API: models (`Normalized`, `ModelConfig`, `load_model`, `grad_only`), data (`Dataset`,
`load_splits`), the attack (`targeted_l2_pgd`, Eq. 1), MAS importance (`mas_importance`,
`ImportancePenalty`, Eq. 2 / 7), methods (`UnlearnConfig`, `method_config`), the unlearner
(`Fragment`, `FragmentOutcome`, `Unlearner`), evaluation (`accuracy`, `goal_mask`) and
training of the reference models (`fit`, `reference_model`, `train_reference`).
"""
from .attack import targeted_l2_pgd
from .data import Dataset, load_splits
from .evaluate import accuracy, goal_mask
from .importance import ImportancePenalty, mas_importance
from .methods import METHODS, UnlearnConfig, method_config
from .models import ModelConfig, Normalized, grad_only, load_model
from .train import fit, reference_model, train_reference
from .unlearn import Fragment, FragmentOutcome, Unlearner

__all__ = ["METHODS", "Dataset", "Fragment", "FragmentOutcome", "ImportancePenalty", "ModelConfig", "Normalized",
           "UnlearnConfig", "Unlearner", "accuracy", "fit", "goal_mask", "grad_only", "load_model", "load_splits",
           "mas_importance", "method_config", "reference_model", "targeted_l2_pgd", "train_reference"]
