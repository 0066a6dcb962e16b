"""Giving freed memory back to the operating system between fragments.

Each fragment allocates and frees tensors of sizes that grow with the retained set (the
objective, the cached prefix features, the distillation pool); glibc keeps freed chunks in its
arenas (one per thread that allocated: the daemon unlearns in a worker thread), so without a trim
the resident size climbs with every fragment although live tensors do not (measured on the
MNIST-5k CNN, engine level, fragments of 8: +12 MB a fragment, flat with a trim after each:
benchmarks/RESULTS.md, "Months of deletions").
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc

__all__ = ["release_freed_memory"]

_LIBC = ctypes.util.find_library("c")
try:
    _TRIM = ctypes.CDLL(_LIBC).malloc_trim if _LIBC else None  # glibc only (every arena since 2.8)
except (OSError, AttributeError):
    _TRIM = None


def release_freed_memory() -> bool:
    """Collect garbage, then return free heap memory of every arena to the OS (glibc malloc_trim);
    True when the trim ran (False on other C libraries, where this only collects garbage)."""
    gc.collect()
    if _TRIM is None:
        return False
    _TRIM(0)
    return True
