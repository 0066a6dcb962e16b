"""Durable state of a checkpoint directory: versions and CURRENT, the ledger and each request's
outcome, the forget vault, rollback, the lock.

Public API: versions (`CheckpointStore`, `Checkpoint`, `Manifest`, `ModelFile`, `RetainedRef`,
`ForgottenSet`, `BASE_VERSION`, `CheckpointError`, `rfc3339`, `parse_rfc3339`, `version_number`),
outcomes and the ledger (`RequestOutcome`, `APPLIED`, `Ledger`, `LedgerError`, `LEDGER_FILE`,
`reconcile`), the vault (`ForgetVault`, `VaultItem`, `VaultIntegrityError`, `read_index`,
`open_vault`, `load_retained`, `next_refs`, `referenced_ids`, `Window`, `last_verified`,
`migrate_legacy`, `generate_kek_file`), the KEK's sources and rotation (`configured_kek`,
`describe_source`, `dispose_kek`, `Disposal`, `KmsKEK`, `VaultError`, `VaultKeyError`, `rotate_vault`,
`finish_rotation`, `vault_key_id`, `Rotation`, `ROTATION_CRASH_POINTS`, `RotationLog`, `RotationRow`,
`DisposalRow`), shreds (`ShredLog`, `ShredRow`), rollback
(`plan_rollback`, `apply_rollback`, `run_rollback`), operator requests to a running daemon
(`request_via_daemon`, `take_request`, `staged_file`, `remove_stale_staged`, `answer_request`, `OperationTimeout`, `OperationRefused`), the single-writer lock (`DirectoryLock`, `CheckpointDirLocked`) and durable
writes and file modes (`write_atomic`, `write_new`, `fsync_dir`, `pretty_json`, `PRIVATE_FILE`, `PRIVATE_UMASK`).
"""
from .checkpoints import CheckpointStore
from .durable import PRIVATE_FILE, PRIVATE_UMASK, fsync_dir, pretty_json, write_atomic, write_new
from .kek import VaultError, VaultKeyError, generate_kek_file
from .kek_source import Disposal, configured_kek, describe_source, dispose_kek
from .kms import KmsKEK
from .ledger import LEDGER_FILE, Ledger, LedgerError
from .ledger_table import LedgerTable
from .ledger import connect as connect_ledger
from .ledger import transaction as ledger_transaction
from .lock import CheckpointDirLocked, DirectoryLock
from .manifest import (BASE_VERSION, MANIFEST_FILE, Checkpoint, CheckpointError, ForgottenSet, Manifest, ModelFile, RetainedRef,
                       parse_rfc3339, rfc3339, version_number)
from .migrate import migrate_legacy
from .outcome import APPLIED, RequestOutcome
from .reconcile import reconcile
from .retained import Window, last_verified, load_retained, needed_ids, next_refs, open_vault, referenced_ids
from .operations import (KINDS, OperationRefused, OperationTimeout, answer_request, remove_stale_staged,
                         request_via_daemon, staged_file, take_request)
from .rollback import apply_rollback, plan_rollback, run_rollback
from .rotation import ROTATION_CRASH_POINTS, Rotation, finish_rotation, rotate_vault, vault_key_id
from .rotation_log import DisposalRow, RotationLog, RotationRow
from .sealed import VaultIntegrityError
from .shreds import ShredLog, ShredRow
from .vault import ForgetVault, VaultItem, read_index
from .verified import VERIFIED_FILE, read_verification, record_verification

__all__ = ["APPLIED", "BASE_VERSION", "Checkpoint", "CheckpointDirLocked", "CheckpointError", "CheckpointStore",
           "DirectoryLock", "Disposal", "DisposalRow", "ForgetVault", "ForgottenSet", "KINDS", "KmsKEK",
           "LEDGER_FILE", "Ledger", "LedgerError", "LedgerTable", "MANIFEST_FILE", "Manifest", "ModelFile", "OperationRefused",
           "OperationTimeout", "PRIVATE_FILE", "PRIVATE_UMASK", "ROTATION_CRASH_POINTS", "RequestOutcome",
           "RetainedRef", "Rotation", "RotationLog", "RotationRow", "ShredLog", "ShredRow", "VERIFIED_FILE",
           "VaultError", "VaultIntegrityError", "VaultItem", "VaultKeyError", "Window", "answer_request",
           "apply_rollback", "configured_kek", "connect_ledger", "describe_source", "dispose_kek", "finish_rotation",
           "fsync_dir", "generate_kek_file", "last_verified", "ledger_transaction", "load_retained",
           "migrate_legacy", "needed_ids", "next_refs", "open_vault", "parse_rfc3339", "plan_rollback",
           "pretty_json", "read_index", "read_verification", "reconcile", "record_verification", "referenced_ids",
           "remove_stale_staged", "request_via_daemon", "rfc3339", "rotate_vault", "run_rollback", "staged_file",
           "take_request", "vault_key_id", "version_number", "write_atomic", "write_new"]
