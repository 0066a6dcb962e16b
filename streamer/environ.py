"""The environment of a child process: only the variables it needs, never the parent's secrets.

A KEK in an environment variable (`privacy.kek_env`, e.g. STREAMER_KEK), cloud credentials, tokens:
a child process that streamer starts (the embedded broker, the demo's daemon) inherits none of
them. It gets the variables these lists name (a trailing `*` names a prefix) and nothing else.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

BASE = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "LC_*", "TZ", "TMPDIR")
PYTHON = ("PYTHONPATH", "PYTHONHOME", "PYTHONUNBUFFERED", "VIRTUAL_ENV", "CONDA_PREFIX", "LD_LIBRARY_PATH",
          "CUDA_*", "NVIDIA_*", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

__all__ = ["BASE", "PYTHON", "child_env"]


def child_env(names: Iterable[str] = BASE, environ: Mapping[str, str] | None = None,
              **values: str) -> dict[str, str]:
    """The variables of `environ` (default os.environ) that `names` allow, plus `values`."""
    names = tuple(names)
    exact = {n for n in names if not n.endswith("*")}
    prefixes = tuple(n[:-1] for n in names if n.endswith("*"))
    source = os.environ if environ is None else environ
    return {**{k: v for k, v in source.items() if k in exact or k.startswith(prefixes)}, **values}
