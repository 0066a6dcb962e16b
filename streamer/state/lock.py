"""The single-writer lock of a checkpoint directory: an exclusive flock on <dir>/LOCK."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..errors import StreamerError

LOCK_FILE = "LOCK"

__all__ = ["LOCK_FILE", "CheckpointDirLocked", "DirectoryLock"]


class CheckpointDirLocked(StreamerError):
    """Another process (a running daemon) owns the checkpoint directory: fail at start-up."""


class DirectoryLock:
    """An exclusive flock on <dir>/LOCK: held by the running daemon, taken by offline tools."""

    def __init__(self, root: str | Path):
        self.path = Path(root) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> bool:
        """True if taken; False if another process (the daemon) holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
