"""llamad's own files (llamad/statefile.py), on real files: written whole or not at all, read
back bounded, a damaged one said once and otherwise only a cost."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from llamad import statefile


def test_round_trip_and_what_is_left_beside_it(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "learned.json"  # its directory is made
    assert statefile.write_json(path, {"version": 1, "models": {"a": [1, 2]}}, "figures")
    assert statefile.read_json(path, "figures") == {"version": 1, "models": {"a": [1, 2]}}
    assert statefile.write_json(path, {"version": 2}, "figures", indent=1)
    assert path.read_text() == '{\n "version": 2\n}'
    assert os.listdir(path.parent) == ["learned.json"]  # no temporary file left


def test_the_umask_decides_who_reads_it(tmp_path: Path) -> None:
    old = os.umask(0o022)  # a download unit's: every model unit reads the cache
    try:
        statefile.replace(tmp_path / "main", "abc")
    finally:
        os.umask(old)
    assert (tmp_path / "main").stat().st_mode & 0o777 == 0o644


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "index.json"
    statefile.replace(path, "old")
    blocker = tmp_path / "dir.json"
    blocker.mkdir()  # os.replace() onto a directory fails after the new file is written
    with caplog.at_level(logging.WARNING, "llamad.statefile"):
        assert not statefile.write_json(blocker, {"a": 1}, "the index")
    assert "cannot save the index to" in caplog.text
    with pytest.raises(OSError):
        statefile.replace(blocker, "new")
    assert path.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["dir.json", "index.json"]


def test_missing_is_quiet_damaged_is_said(tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "llamad.statefile"):
        assert statefile.read_json(tmp_path / "none.json", "the cache") is None
        assert statefile.read_json(None, "the cache") is None
        assert caplog.text == ""
        damaged = tmp_path / "damaged.json"
        damaged.write_bytes(b'{"version": 1, "entr')
        assert statefile.read_json(damaged, "the cache") is None
    assert f"ignoring the cache in {damaged}" in caplog.text


def test_a_read_is_bounded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "big.json"
    path.write_text('"' + "x" * 100 + '"')
    assert statefile.read_json(path, "the store", limit=102) == "x" * 100
    with caplog.at_level(logging.WARNING, "llamad.statefile"):
        assert statefile.read_json(path, "the store", limit=101) is None
    assert "longer than 101 bytes" in caplog.text
