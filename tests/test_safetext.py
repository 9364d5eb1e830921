"""Control characters never reach systemd or a log line raw."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
from helpers import ggufgen
from helpers.catalogs import age, config

from llamad.catalog.catalog import scan
from llamad.log import _clean
from llamad.safetext import one_line, unsafe
from llamad.systemd.bus import transient_args
from llamad.systemd.units import UnitError, UnitSpec, transient_properties


def _start_args(spec: UnitSpec) -> list[Any]:
    return transient_args(spec.name, transient_properties(spec))

HOSTILE = ["a\nb", "tab\there", "nul\0", "del\x7f", "esc\x1b[31m", "bad\udcff",
           "csi\x9b2J", "nel\x85"]  # C1 too: U+009B is CSI to xterm


def test_unsafe_and_one_line(subtests: Any) -> None:
    for text in HOSTILE:
        with subtests.test(text=text):
            assert unsafe(text) is not None
            shown = one_line(text)
            assert unsafe(shown) is None and "\n" not in shown
    for text in ["gemma-a", "50%-off", "br[ack]et", "user/repo:Q4_K_M", "ü"]:
        assert unsafe(text) is None and one_line(text) == text


def test_scan_refuses_hostile_names_with_one_problem_line(tmp_path: Path) -> None:
    d = tmp_path / "models"
    ggufgen.write_model(d / "good.gguf")
    for name in ("evil\n[Service]\nExecStopPost=+touch x", "tab\there", "50%-off"):
        os.link(d / "good.gguf", d / f"{name}.gguf")
    os.makedirs(d / "dir\x01")
    os.link(d / "good.gguf", d / "dir\x01" / "m.gguf")
    age(d)
    snap = scan(config(d))
    assert sorted(snap.models) == ["50%-off", "good"]
    refused = [p for p in snap.problems if "control characters" in p]
    assert len(refused) == 3, snap.problems
    assert all(unsafe(p) is None for p in snap.problems)
    assert any(f"{d}/evil\\n[Service]\\nExecStopPost=+touch x.gguf:" in p for p in refused)


def test_marshalling_refuses_control_characters(subtests: Any) -> None:
    base = UnitSpec(name="llama-server@m.service", description="m", argv=("/bin/llama", "-m"))
    for field, value in [("description", "m\n[Service]"), ("argv", ("/bin/llama", "a\tb")),
                         ("environment", ("LLAMAD_MODEL=a\nb",)), ("name", "x\n.service")]:
        with subtests.test(field=field), pytest.raises(UnitError, match="control characters"):
            _start_args(UnitSpec(**{**base.__dict__, field: value}))
    assert _start_args(base)


def test_log_lines_stay_one_line() -> None:
    record = logging.LogRecord("llamad", logging.WARNING, __file__, 1, "model %s: %s",
                               ("a\nb", "x\ry"), None)
    assert _clean(record)
    assert record.getMessage() == "model a\\nb: x\\ry"
