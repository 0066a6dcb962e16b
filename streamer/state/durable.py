"""Crash-safe file primitives shared by the checkpoint store, the forget vault and its key files.

    pretty_json(data)         the bytes of a human-read JSON file (manifests, attacks.json)
    write_new(path, data)     create (never replace), write, fsync
    write_atomic(path, data)  temp file + fsync + os.replace (the caller fsyncs the directory)
    fsync_dir(path)           make renames and unlinks in a directory durable
    erase_file(path)          overwrite with zeros, fsync, unlink: NIST SP 800-88 Rev. 1 "clear" at
                              file level (the file system may still hold old blocks; crypto-shredding
                              is what makes vault ciphertext unreadable, this only removes the bytes)
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

TEMP_PREFIX = ".tmp-"

__all__ = ["TEMP_PREFIX", "erase_file", "fsync_dir", "pretty_json", "write_atomic", "write_new"]


def pretty_json(data: Any) -> bytes:
    """UTF-8 JSON with sorted keys, 2-space indent and a final newline. Raises TypeError for
    values JSON cannot hold."""
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")


def write_new(path: Path, data: bytes) -> None:
    """Create `path` (FileExistsError if it exists), write `data`, fsync. Raises OSError."""
    with open(path, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically: readers see the old bytes or the new, never a mix.
    Raises OSError (the temp file is removed); fsync the directory afterwards to make it durable."""
    temp = path.with_name(f"{TEMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        write_new(temp, data)
        os.replace(temp, path)
    except OSError:
        temp.unlink(missing_ok=True)
        raise


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def erase_file(path: Path) -> bool:
    """Overwrite `path` in place with zeros, fsync, unlink; False when it did not exist. Raises OSError."""
    try:
        with open(path, "r+b") as fh:
            fh.write(bytes(os.fstat(fh.fileno()).st_size))
            fh.flush()
            os.fsync(fh.fileno())
    except FileNotFoundError:
        return False
    path.unlink(missing_ok=True)
    return True
