"""Text for people: a count with its noun."""
from __future__ import annotations


def plural(n: float, noun: str) -> str:
    """'1 version', '2 versions', '0.5 days' (numbers as `:g` writes them; English -s plurals only)."""
    return f"{n:g} {noun}" if n == 1 else f"{n:g} {noun}s"
