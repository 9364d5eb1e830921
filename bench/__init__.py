"""Benchmarks of llamad against llama-server directly and llama.cpp's router mode.

Run `make bench` (or `.venv/bin/python -m bench`); see docs/benchmarks.md.
The harness reuses the integration tests' systemd box and llamad fixture.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))
