"""`uri` samples: a file under a configured root, opened once and checked on the open file.

    {"uri": "file:///<path under data.uri_roots>"}    .png .jpg .jpeg .npy .pt

The path (`..` collapsed, as text) must lie under a root before anything is opened, so a path
elsewhere is refused without telling whether it exists. The file is then opened once (never
blocking: a FIFO is refused, not waited on), and what was opened must be a regular file whose real
path lies inside a root: links that stay inside a root are followed, a link out is refused. The
check is made on the open file (its device and inode against the real path's), so swapping a link
between the check and the read changes nothing, and the bytes read are the bytes checked. Reasons
quote the uri as sent, never a resolved path (`InvalidEvent.detail` has it, for the operator).
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .invalid import InvalidEvent

FILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".npy", ".pt")
_OPEN = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)

__all__ = ["FILE_SUFFIXES", "read_uri"]


def read_uri(uri: object, roots: tuple[Path, ...], max_bytes: int) -> tuple[bytes, str]:
    """The bytes of the file `uri` names and its suffix (lower case). Raises InvalidEvent for
    another scheme, a host, a path outside the roots (before or after links are followed), an
    unsupported suffix, a file that is missing, not regular or over `max_bytes`."""
    path = _lexical_path(uri)
    real_roots = [os.path.realpath(root) for root in roots]
    outside = InvalidEvent(f"uri {uri} is outside the allowed roots (data.uri_roots)")
    if not _under(path, [os.path.abspath(root) for root in roots] + real_roots):
        raise outside
    try:
        fd = os.open(path, _OPEN)
    except OSError as err:
        raise InvalidEvent(f"uri {uri}: file not found", detail=f"uri {uri}: cannot open {path}: {err}") from err
    try:
        info = os.fstat(fd)
        real = os.path.realpath(path)
        try:
            same = os.stat(real)
        except OSError:
            same = None
        if same is None or (same.st_dev, same.st_ino) != (info.st_dev, info.st_ino) or not _under(real, real_roots):
            raise InvalidEvent(outside.reason, detail=f"uri {uri} resolves to {real}, outside the roots {real_roots}")
        suffix = Path(real).suffix.lower()  # the file's own, as before: a link named .png may hold a .npy
        if suffix not in FILE_SUFFIXES:
            raise InvalidEvent(f"uri file type {suffix or '(none)'!r} is not supported; use {', '.join(FILE_SUFFIXES)}")
        if not stat.S_ISREG(info.st_mode):
            raise InvalidEvent(f"uri {uri}: file not found (not a regular file)")
        if info.st_size > max_bytes:
            raise InvalidEvent(f"file {uri} is {info.st_size} bytes, more than the {max_bytes} allowed")
        return _read(fd, max_bytes, uri), suffix
    finally:
        os.close(fd)


def _lexical_path(uri: object) -> str:
    """The absolute path of a file:/// uri, `..` collapsed as text (no file system access)."""
    if not isinstance(uri, str):
        raise InvalidEvent(f"uri must be a string, got {uri!r}")
    parts = urlsplit(uri)
    if parts.scheme != "file":
        raise InvalidEvent(f"uri scheme must be file, got {parts.scheme or 'none'!r}")
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise InvalidEvent(f"uri must be file:///ABSOLUTE/PATH with no host, query or fragment, got {uri!r}")
    path = unquote(parts.path)
    if "\0" in path or not path.startswith("/"):
        raise InvalidEvent(f"uri must be file:///ABSOLUTE/PATH, got {uri!r}")
    return os.path.normpath(path)


def _under(path: str, roots: list[str]) -> bool:
    return any(os.path.commonpath([path, root]) == root for root in roots)


def _read(fd: int, max_bytes: int, uri: str) -> bytes:
    """Up to max_bytes from `fd` (a file that grew past it is refused)."""
    chunks, total = [], 0
    while chunk := os.read(fd, min(1 << 20, max_bytes + 1 - total)):
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise InvalidEvent(f"file {uri} is more than the {max_bytes} bytes allowed")
    return b"".join(chunks)

