"""The unlearning engine: pure tensor code, no Kafka, disk or HTTP.

Public API: models (`Normalized`, `ModelConfig`, `load_model`, `published_model`, `load_net_state`,
`grad_only`, `source_format`, `split_normalized_state`, the reference CNNs `REFERENCE` /
`REFERENCE_INPUT`), model files (`FORMATS`, `USER_LOADERS`, `save_user_model`,
`load_user_model_bytes`, `read_state_dict`, `clone_module`), parameter choice (`select_trainable`,
`head_parameter_names`), data (`Dataset`, `DATASETS`, `load_splits`), the attack
(`targeted_l2_pgd`, Eq. 1), MAS importance (`mas_importance`, `ImportancePenalty`, Eq. 2 / 7),
methods (`UnlearnConfig`, `method_config`, `METHODS`), the unlearner (`Fragment`,
`FragmentOutcome`, `Unlearner`, `UNSEEN`), goals and evaluation (`goal_met`, `goal_gap`,
`goal_mask`, `accuracy`, `logits`), data parallelism over torch.distributed (`Shard`, `join_group`,
`follow`, `leave_group`, `GroupLost`, `ALONE`), attack-based verification (`attack_report`), canaries
(`BENCHMARK_CANARIES`) and training of the reference models (`fit`, `reference_model`,
`train_reference`).

Inside, `Unlearner.unlearn` is a short recipe over named parts: `steps.StepInputs` (what each
step feeds the model), `terms.FragmentLoss` (the objective's terms), `fragment.StopTest` and
`fragment.Trend` (when to stop, and why a cap was hit), `unseen.FeatureGoal`.
"""
from .attack import targeted_l2_pgd
from .canaries import BENCHMARK_CANARIES
from .data import DATASETS, Dataset, load_splits
from .distributed import ALONE, GroupLost, Shard, follow, join_group, leave_group
from .evaluate import accuracy, goal_mask, logits
from .formats import FORMATS, USER_LOADERS, clone_module, load_user_model_bytes, read_state_dict, save_user_model
from .importance import ImportancePenalty, mas_importance
from .memory import release_freed_memory
from .methods import METHODS, UnlearnConfig, method_config
from .models import (REFERENCE, REFERENCE_INPUT, ModelConfig, Normalized, grad_only, load_model, load_net_state,
                     published_model, source_format, split_normalized_state)
from .objectives import goal_gap, goal_met
from .train import fit, reference_model, train_reference
from .trainable import head_parameter_names, select_trainable
from .unlearn import Fragment, FragmentOutcome, Unlearner
from .unseen import UNSEEN
from .verification import attack_report

__all__ = ["ALONE", "BENCHMARK_CANARIES", "DATASETS", "FORMATS", "METHODS", "REFERENCE", "REFERENCE_INPUT", "UNSEEN",
           "USER_LOADERS", "Dataset", "Fragment", "FragmentOutcome", "GroupLost", "ImportancePenalty", "ModelConfig", "Normalized",
           "Shard", "UnlearnConfig", "Unlearner", "accuracy", "attack_report", "clone_module", "fit", "follow", "goal_gap", "goal_mask",
           "goal_met", "grad_only", "head_parameter_names", "join_group", "leave_group", "load_model", "load_net_state", "load_splits",
           "load_user_model_bytes", "logits", "mas_importance", "method_config", "published_model", "read_state_dict",
           "reference_model", "release_freed_memory", "save_user_model", "select_trainable", "source_format", "split_normalized_state",
           "targeted_l2_pgd", "train_reference"]
