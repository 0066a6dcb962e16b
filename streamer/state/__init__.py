"""Durable state of a checkpoint directory: versions and CURRENT, the ledger, rollback, the lock.

Public API: `CheckpointStore`, `Checkpoint`, `Manifest`, `ForgottenSet`, `Ledger`, `Outcome`,
`reconcile`, `DirectoryLock`, `plan_rollback` / `apply_rollback` / `run_rollback`.
"""
from .checkpoints import CheckpointStore
from .ledger import Ledger, Outcome, reconcile
from .lock import DirectoryLock
from .manifest import Checkpoint, ForgottenSet, Manifest
from .rollback import apply_rollback, plan_rollback, run_rollback

__all__ = ["Checkpoint", "CheckpointStore", "DirectoryLock", "ForgottenSet", "Ledger", "Manifest", "Outcome",
           "apply_rollback", "plan_rollback", "reconcile", "run_rollback"]
