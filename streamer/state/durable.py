"""Crash-safe file primitives shared by the checkpoint store, the forget vault and its key files.

    pretty_json(data)         the bytes of a human-read JSON file (manifests, attacks.json)
    write_new(path, data)     create (never replace, never through a symlink), write, fsync
    write_atomic(path, data)  temp file + fsync + os.replace (the caller fsyncs the directory)
    read_file(path)           the bytes of a regular file, never read through a symlink
    fsync_dir(path)           make renames and unlinks in a directory durable
    erase_file(path)          overwrite with zeros, fsync, unlink: NIST SP 800-88 Rev. 1 "clear" at
                              file level (the file system may still hold old blocks; crypto-shredding
                              is what makes this directory's vault ciphertext undecryptable, not its
                              backups; this only removes the bytes)
    PRIVATE_UMASK             the process-wide umask the CLI sets (077): what a library creates is the owner's
    make_dir / restrict       create a directory / tighten an existing path to an explicit mode

Modes (README "Security"): what holds secrets or personal data (the vault, the ledger, operator
request files, logs, reports) is the owner's alone, PRIVATE_FILE / PRIVATE_DIR; published versions
(model files, manifests, CURRENT) may be SHARED_FILE / SHARED_DIR, readable by the group of a
serving process (`checkpoints.group_readable`). Every mode is set explicitly, whatever the umask.
"""
from __future__ import annotations

import errno
import json
import os
import stat
import uuid
from pathlib import Path
from typing import Any

TEMP_PREFIX = ".tmp-"
PRIVATE_FILE, PRIVATE_DIR = 0o600, 0o700
SHARED_FILE, SHARED_DIR = 0o640, 0o750
PRIVATE_UMASK = 0o077
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

__all__ = ["PRIVATE_DIR", "PRIVATE_FILE", "PRIVATE_UMASK", "SHARED_DIR", "SHARED_FILE", "TEMP_PREFIX", "erase_file", "fsync_dir",
           "make_dir", "pretty_json", "read_file", "restrict", "write_atomic", "write_new"]


def pretty_json(data: Any) -> bytes:
    """UTF-8 JSON with sorted keys, 2-space indent and a final newline. Raises TypeError for
    values JSON cannot hold."""
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")


def write_new(path: Path, data: bytes, mode: int = PRIVATE_FILE) -> None:
    """Create `path` with `mode` (FileExistsError if it exists, OSError(ELOOP) if it is a symlink),
    write `data`, fsync. Raises OSError."""
    fd = os.open(path, _NEW, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have taken bits that `mode` grants on purpose
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = PRIVATE_FILE) -> None:
    """Replace `path` with `data` (file mode `mode`) atomically: readers see the old bytes or the
    new, never a mix; the temp file has a fresh random name and is created exclusively, and the
    rename replaces a symlink at `path` rather than writing through it. Raises OSError (the temp
    file is removed); fsync the directory afterwards to make it durable."""
    temp = path.with_name(f"{TEMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        write_new(temp, data, mode)
        os.replace(temp, path)
    except OSError:
        temp.unlink(missing_ok=True)
        raise


def read_file(path: Path, limit: int | None = None) -> bytes:
    """The bytes of the regular file `path`. Raises OSError: ELOOP when it is a symlink, EINVAL
    when it is not a regular file or holds more than `limit` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "a symbolic link, where streamer writes a file (not followed)", str(path)) from err
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(22, "not a regular file", str(path))
        if limit is not None and info.st_size > limit:
            raise OSError(22, f"larger than {limit} bytes", str(path))
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read() if limit is None else fh.read(limit + 1)
    finally:
        os.close(fd)
    if limit is not None and len(data) > limit:
        raise OSError(22, f"larger than {limit} bytes", str(path))
    return data


def make_dir(path: Path, mode: int = PRIVATE_DIR) -> None:
    """Create `path` (and missing parents) and give it `mode` (also when it existed, if ours)."""
    path.mkdir(parents=True, exist_ok=True, mode=mode)
    restrict(path, mode)


def restrict(path: Path, mode: int) -> None:
    """chmod `path` to `mode` when it exists, is not a symlink and belongs to this user (a path
    another user owns, e.g. a mounted volume's root, is left as it is)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISLNK(info.st_mode) and info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) != mode:
        os.chmod(path, mode)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def erase_file(path: Path) -> bool:
    """Overwrite `path` in place with zeros, fsync, unlink; False when it did not exist. A symlink
    is unlinked, never followed (its target is not ours to erase). Raises OSError."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return False
    except OSError:
        if not os.path.islink(path):
            raise
        path.unlink(missing_ok=True)
        return True
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            with os.fdopen(os.dup(fd), "r+b") as fh:
                fh.write(bytes(os.fstat(fd).st_size))
                fh.flush()
                os.fsync(fh.fileno())
    finally:
        os.close(fd)
    path.unlink(missing_ok=True)
    return True
