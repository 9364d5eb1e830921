"""Linters run as tests: ruff on everything, mypy --strict on llamad/ and tests/, and no test
module used as a library by another (what tests share is in tests/helpers/), and no
dataclass of llamad's without a docstring."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff() -> None:
    out = _run(str(BIN / "ruff"), "check", "llamad", "tests", "bench", "bench/gpu_check")
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_strict() -> None:
    out = _run(str(BIN / "mypy"))
    assert out.returncode == 0, out.stdout + out.stderr


def test_no_test_module_imports_another() -> None:
    found = []
    for path in (ROOT / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.relative_to(ROOT)} imports {n}" for n in names
                      if n.split(".")[0].startswith("test_")]
    assert found == []


def test_no_unit_file_blocks_transient_units() -> None:
    # A llama-server@.service on disk would shadow the transient units.
    assert not list(ROOT.rglob("llama-server@.service"))


def test_every_dataclass_has_a_docstring() -> None:
    """A dataclass without one gets one made from inspect.signature() of the class, on every
    start: tens of microseconds a class, milliseconds over llamad's (issue #27)."""
    missing = []
    for path in sorted((ROOT / "llamad").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and ast.get_docstring(node) is None and any(
                    "dataclass" in ast.unparse(d) for d in node.decorator_list):
                missing.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not missing, "dataclasses without a docstring:\n" + "\n".join(missing)
