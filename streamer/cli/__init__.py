"""The commands (run, demo, produce, train, checkpoints, rollback, verify, keygen, erasure-report). Public API: `main`, `build_parser`."""
from .main import build_parser, main

__all__ = ["build_parser", "main"]
