"""The code keeps its shape: small modules and classes (DESIGN.md §4)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "ragline"
DATA_MODULES = {"cache/guards_words.py"}
"""Word lists, not logic: exempt from the module size limit."""
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 350


def _modules() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if p.relative_to(ROOT).as_posix() not in DATA_MODULES)


def test_no_module_over_600_lines() -> None:
    big = {p.relative_to(ROOT).as_posix(): n for p in _modules() if (n := len(p.read_text().splitlines())) > 600}
    assert big == {}


def test_no_class_over_350_lines() -> None:
    big: dict[str, int] = {}
    for p in _modules():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                n = node.end_lineno - node.lineno + 1
                if n > MAX_CLASS_LINES:
                    big[f"{p.relative_to(ROOT).as_posix()}:{node.name}"] = n
    assert big == {}
