"""Unit names for hostile model names, checked against systemd's own parser."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from pytest_subtests import SubTests

from llamad.systemd.downloadunit import download_unit, remove_unit
from llamad.systemd.unitname import (
    INSTANCE_MAX,
    UNIT_NAME_MAX,
    instance_name,
    is_model_unit,
    unit_name,
)
from llamad.systemd.units import Markers, UnitStatus

HOSTILE = [
    "../x", "a\\x2db", "@", "a\x00b", "x" * 300, "Ünïcödé-模型", ".hidden", "user/repo:Q4_K_M",
    "a/b", "a-b", "", " ", "a b", "-leading", "a@b.service", "..", "x" * 234, "x" * 235,
    "$(rm -rf /)", "tab\there", "new\nline", "%i%n", "a.service",
]
READABLE = ["gemma", "Qwen3-8B-Q4_K_M", "user-repo:Q8_0", "a_b.c"]


def systemd_accepts(unit: str) -> bool:
    """systemd-escape refuses to take the instance out of an invalid unit name."""
    run = subprocess.run(["systemd-escape", "--unescape", "--instance", unit],
                         capture_output=True, text=True)
    return run.returncode == 0


@pytest.fixture(scope="module", autouse=True)
def _need_systemd_escape() -> None:
    assert shutil.which("systemd-escape"), "systemd-escape (package systemd) is required"


def test_oracle_rejects_invalid_names() -> None:
    # The check below means something only if systemd rejects what it should.
    assert not systemd_accepts("llama-server@a/b.service")
    assert not systemd_accepts("llama-server@" + "x" * 240 + ".service")
    assert systemd_accepts("llama-server@ok.service")


def test_hostile_names(subtests: SubTests) -> None:
    units: dict[str, str] = {}
    for name in HOSTILE + READABLE:
        with subtests.test(name=name):
            unit = unit_name(name)
            assert systemd_accepts(unit), unit
            assert len(unit) <= UNIT_NAME_MAX
            assert not instance_name(name).startswith(".")
            assert is_model_unit(unit)
            assert unit == unit_name(name)  # stable
            assert unit not in units, f"{name!r} and {units.get(unit)!r} collide"
            units[unit] = name


def test_readable_names_are_kept(subtests: SubTests) -> None:
    for name in READABLE:
        with subtests.test(name=name):
            assert instance_name(name) == name


def test_changed_names_stay_readable_and_distinct() -> None:
    assert instance_name("user/repo:Q4_K_M").startswith("user-repo:Q4_K_M-")
    assert instance_name("a/b") != instance_name("a-b") == "a-b"
    assert instance_name(".hidden").startswith("_hidden-")


def test_markers_map_a_unit_back_to_its_model() -> None:
    markers = Markers("user/repo:Q4_K_M", "unix:/run/llamad/x/sock", "0123456789abcdef")
    status = UnitStatus("llama-server@x.service",
                        environment=("PATH=/usr/bin", *markers.environment()))
    assert status.ours and status.markers == markers
    assert UnitStatus("u", environment=("PATH=/usr/bin", "LLAMAD_MODEL=a")).markers is None


def test_download_and_removal_units_fit_systemds_limit_too(subtests: SubTests) -> None:
    """Their prefixes are longer than llama-server@'s, and they run with PrivateTmp= as well:
    a name at the model units' limit made a download unit too long for its /tmp directory
    ("File name too long" at every start)."""
    for name in ["x" * INSTANCE_MAX, "x" * 300, "u/" + "r" * 250 + ":Q4_0", "a/b"]:
        for unit in (download_unit(name), remove_unit(name)):
            with subtests.test(unit=unit):
                assert len(unit) <= UNIT_NAME_MAX
                assert systemd_accepts(unit), unit
    assert download_unit("x" * INSTANCE_MAX) != download_unit("x" * (INSTANCE_MAX - 1))
