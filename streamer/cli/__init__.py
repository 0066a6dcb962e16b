"""The commands (run, demo, produce, train, checkpoints, rollback, verify). Public API: `main`, `build_parser`."""
from .main import build_parser, main

__all__ = ["build_parser", "main"]
