"""README "Security" and the docstrings say what is true: every test the threat model cites exists,
and no text promises more of a shred than crypto-shredding gives (backups keep the wrapped DEK)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import streamer.state.durable
import streamer.state.vault

ROOT = Path(__file__).resolve().parents[1]
ACTORS = ("producers", "metrics port", "operators", "other local users", "checkpoint directory", "backup",
          "torchrun group", "child processes")


def _section(title: str) -> str:
    return (ROOT / "README.md").read_text().split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def _defined(path: Path) -> set[str]:
    """Every `Class::method` and `function` name defined in a test file."""
    tree = ast.parse(path.read_text())
    names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}::{m.name}" for m in node.body if isinstance(m, ast.FunctionDef)}
    return names


def test_the_threat_model_names_every_party_and_only_tests_that_exist() -> None:
    """Each party has a row; each cited `tests/...py::...` exists, and every party cites one."""
    rows = [r for r in _section("Security").splitlines() if r.startswith("| **")]
    assert [any(a in r.split("|")[1] for r in rows) for a in ACTORS] == [True] * len(ACTORS)
    for row in rows:
        cited = re.findall(r"`(tests/[\w/]+\.py)::([\w:]+)`", row)
        assert cited, row
        for path, name in cited:
            assert (ROOT / path).is_file() and name in _defined(ROOT / path), f"{path}::{name}"


def test_docstrings_and_readme_agree_on_what_a_shred_guarantees() -> None:
    """The vault's docstring and README's Data protection both say a backup taken before a shred
    stays decryptable with the KEK that wrapped it (until a rotation destroys that KEK); nothing
    claims a shred reaches every copy or backup."""
    texts = {"vault.py": streamer.state.vault.__doc__, "durable.py": streamer.state.durable.__doc__,
             "README": _section("Data protection") + _section("Security")}
    vault_doc = " ".join(texts["vault.py"].split())
    assert "does not reach copies" in vault_doc and "stays decryptable for as long as the KEK" in vault_doc
    assert "a backup taken before the shred still decrypts with that KEK" in " ".join(texts["README"].split())
    for where, text in texts.items():
        flat = " ".join(text.split()).lower()
        assert "every copy and backup" not in flat and "in every copy" not in flat, where
