"""Linters run as tests: ruff on everything, mypy --strict on llamad/."""

from __future__ import annotations

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


def test_no_unit_file_blocks_transient_units() -> None:
    # A llama-server@.service on disk would shadow the transient units.
    assert not list(ROOT.rglob("llama-server@.service"))
