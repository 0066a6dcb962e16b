"""Durable state of a checkpoint directory: versions and CURRENT, the ledger and each request's
outcome, the forget vault, rollback, the lock.

Public API: versions (`CheckpointStore`, `Checkpoint`, `Manifest`, `ModelFile`, `RetainedRef`,
`ForgottenSet`, `BASE_VERSION`, `CheckpointError`, `rfc3339`, `parse_rfc3339`, `version_number`),
outcomes and the ledger (`RequestOutcome`, `APPLIED`, `Ledger`, `LedgerError`, `LEDGER_FILE`,
`reconcile`), the vault (`ForgetVault`, `VaultItem`, `VaultIntegrityError`, `read_index`,
`open_vault`, `load_retained`, `next_refs`, `referenced_ids`, `Window`, `last_verified`,
`migrate_legacy`, `generate_kek_file`), shreds (`ShredLog`, `ShredRow`), rollback
(`plan_rollback`, `apply_rollback`, `run_rollback`), operator requests to a running daemon
(`request_via_daemon`, `take_request`, `staged_file`, `remove_stale_staged`, `answer_request`, `OperationTimeout`, `OperationRefused`), the single-writer lock (`DirectoryLock`, `CheckpointDirLocked`) and durable
writes and file modes (`write_atomic`, `write_new`, `fsync_dir`, `pretty_json`, `PRIVATE_FILE`, `PRIVATE_UMASK`).
"""
from .checkpoints import CheckpointStore
from .durable import PRIVATE_FILE, PRIVATE_UMASK, fsync_dir, pretty_json, write_atomic, write_new
from .kek import generate_kek_file
from .ledger import LEDGER_FILE, Ledger, LedgerError
from .lock import CheckpointDirLocked, DirectoryLock
from .manifest import (BASE_VERSION, Checkpoint, CheckpointError, ForgottenSet, Manifest, ModelFile, RetainedRef,
                       parse_rfc3339, rfc3339, version_number)
from .migrate import migrate_legacy
from .outcome import APPLIED, RequestOutcome
from .reconcile import reconcile
from .retained import Window, last_verified, load_retained, needed_ids, next_refs, open_vault, referenced_ids
from .operations import (KINDS, OperationRefused, OperationTimeout, answer_request, remove_stale_staged,
                         request_via_daemon, staged_file, take_request)
from .rollback import apply_rollback, plan_rollback, run_rollback
from .sealed import VaultIntegrityError
from .shreds import ShredLog, ShredRow
from .vault import ForgetVault, VaultItem, read_index

__all__ = ["PRIVATE_FILE", "PRIVATE_UMASK", "write_new", "APPLIED", "BASE_VERSION", "KINDS", "LEDGER_FILE", "Checkpoint", "CheckpointDirLocked", "CheckpointError",
           "CheckpointStore", "DirectoryLock", "ForgetVault", "ForgottenSet", "Ledger", "LedgerError", "Manifest",
           "ModelFile", "OperationRefused", "OperationTimeout", "RequestOutcome", "RetainedRef", "ShredLog", "ShredRow", "VaultIntegrityError", "VaultItem",
           "Window", "answer_request", "apply_rollback", "fsync_dir", "generate_kek_file", "last_verified",
           "load_retained", "migrate_legacy", "needed_ids", "next_refs", "open_vault", "parse_rfc3339", "plan_rollback",
           "pretty_json", "read_index", "reconcile", "referenced_ids", "remove_stale_staged", "request_via_daemon", "rfc3339", "run_rollback",
           "staged_file", "take_request", "version_number", "write_atomic"]
