"""The unlearning engine: pure tensor code, no Kafka, disk or HTTP.

Public API: models (`Normalized`, `ModelConfig`, `load_model`, `published_model`, `load_net_state`,
`grad_only`), model files (`FORMATS`, `save_user_model`, `load_user_model_bytes`, `read_state_dict`,
`clone_module`), parameter choice (`select_trainable`, `head_parameter_names`), data (`Dataset`,
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
from .formats import FORMATS, clone_module, load_user_model_bytes, read_state_dict, save_user_model
from .models import ModelConfig, Normalized, grad_only, load_model, load_net_state, published_model
from .train import fit, reference_model, train_reference
from .trainable import head_parameter_names, select_trainable
from .unlearn import Fragment, FragmentOutcome, Unlearner

__all__ = ["FORMATS", "METHODS", "Dataset", "Fragment", "FragmentOutcome", "ImportancePenalty", "ModelConfig",
           "Normalized", "UnlearnConfig", "Unlearner", "accuracy", "clone_module", "fit", "goal_mask", "grad_only",
           "head_parameter_names", "load_model", "load_net_state", "load_splits", "load_user_model_bytes",
           "mas_importance", "method_config", "published_model", "read_state_dict", "reference_model",
           "save_user_model", "select_trainable", "targeted_l2_pgd", "train_reference"]
