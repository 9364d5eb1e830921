"""The benchmark harness runs end to end: `python -m bench --quick` writes a report with
every section. Numbers are not checked: benchmarks are not timed tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import rig

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


def test_quick_run_reports_every_section(tmp_path: Path) -> None:
    reason = rig.missing_requirements()
    if reason:
        if os.environ.get("LLAMAD_REQUIRE_BOX") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    out = tmp_path / "benchmarks.md"
    run = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text = out.read_text()
    for heading in ("## Targets", "### 1. Added latency", "### 2. Streaming",
                    "### 3. Cold start", "### 4. Swap", "### 5. Concurrency",
                    "### 6. Footprint", "### 7. Scale", "### 8. A conversation across a swap"):
        assert heading in text, f"{heading!r} missing from the report"
    for row in ("| /tokenize | llamad |", "| /tokenize | router |",
                "| 1-token completion | direct |", "| tokens/s | llamad |",
                "| request to first token | bare |", "| swap request", "| aggregate tokens/s",
                "| idle RSS, 4 models |", "| socket-activated cold start to GET /v1/models |",
                "| socket-activated cold start to GET /v1/models, in the package's sandbox |",
                "| GET /v1/models, 500 models",
                "| turn 2 time to first token | llamad |",
                "| turn 2 time to first token | re-prefill |"):
        assert row in text, f"no {row!r} row in the report"
    # Every target has a verdict.
    targets = text.split("## Targets")[1].split("## Results")[0]
    assert targets.count("| yes |") + targets.count("| **no** |") == 12
    # Printed last: each target beside the run recorded before (none for this file).
    assert "Targets against the run recorded before (none recorded):" in run.stdout
    for png in ("bench-latency.png", "bench-startup.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert (tmp_path / "benchmarks.json").exists()
