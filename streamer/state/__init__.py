"""Durable state of a checkpoint directory: versions and CURRENT, the ledger, the forget vault,
rollback, the lock.

Public API: `CheckpointStore`, `Checkpoint`, `Manifest`, `RetainedRef`, `ForgottenSet`, `Ledger`,
`Outcome`, `reconcile`, `ForgetVault`, `ShredLog`, `open_vault`, `load_retained`, `DirectoryLock`,
`plan_rollback` / `apply_rollback` / `run_rollback`.
"""
from .checkpoints import CheckpointStore
from .ledger import Ledger, Outcome, reconcile
from .lock import DirectoryLock
from .manifest import Checkpoint, ForgottenSet, Manifest, RetainedRef
from .retained import load_retained, open_vault
from .rollback import apply_rollback, plan_rollback, run_rollback
from .shreds import ShredLog
from .vault import ForgetVault

__all__ = ["Checkpoint", "CheckpointStore", "DirectoryLock", "ForgetVault", "ForgottenSet", "Ledger", "Manifest",
           "Outcome", "RetainedRef", "ShredLog", "apply_rollback", "load_retained", "open_vault", "plan_rollback",
           "reconcile", "run_rollback"]
