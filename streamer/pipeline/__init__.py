"""The fragment pipeline: collect -> fragment -> failure policy -> commit -> outbox.

    collector    records into the pending fragment, or answered at once (rejected, duplicate);
                 undecodable batches skipped; conflicting goals (goals.py)
    worker       one group of requests through the engine: guard rails, evaluation, each
                 request's outcome, the retained set's ageing
    quarantine   the failure policy (failures.py) for a fragment: bisection from the last good model
    commit       the one order of every durable step (vault, version, ledger, receipts, offsets,
                 shreds), its crash points (faults.py), and the repair of a crash at start
    outbox       ledger rows, receipts, dead letters and checkpoint records
    keeper       verification windows between fragments (shredding.py decides), replay batches
    budget       the utility budget: deferred requests, their deadlines, "retrain advised"
    forgotten    the exclusion list a retraining needs; rebase: hand over to the retrained model

Public API: `Collector`, `Accepted`, `Repeat`, `GoalIndex`, `FragmentWorker`, `FragmentResult`,
`run_quarantined`, `FragmentRun`, `Commit`, `Outbox`, `DeliveryError`, `VaultKeeper`, the
failure types and `faults`.
"""
from . import faults
from .budget import UtilityBudget, deadline_of
from .collector import Accepted, Collector, Repeat
from .commit import Commit, Repaired
from .failures import EngineFailure, FragmentFailure, NonFiniteOutputs, UtilityFloorBreached
from .goals import GoalIndex
from .keeper import VaultKeeper, replay_batch
from .outbox import DeliveryError, Outbox
from .forgotten import exclusion_list, listed_ids
from .quarantine import FragmentRun, run_quarantined
from .rebase import RebaseRefused, run_rebase
from .worker import FragmentResult, FragmentWorker

__all__ = ["Accepted", "Collector", "Commit", "DeliveryError", "EngineFailure", "FragmentFailure",
           "FragmentResult", "FragmentRun", "FragmentWorker", "GoalIndex", "NonFiniteOutputs", "Outbox", "Repaired",
           "Repeat", "UtilityBudget", "UtilityFloorBreached", "VaultKeeper", "deadline_of", "exclusion_list", "faults", "listed_ids", "replay_batch", "run_quarantined", "run_rebase",
           "RebaseRefused"]
