"""Fixtures shared by all tests: the systemd box and the real assets."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import rig
from helpers import supervised

from llamad.config import Config

# .ci/run sets this: there, a missing box is a failure, not a skip.
REQUIRE_BOX = os.environ.get("LLAMAD_REQUIRE_BOX") == "1"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in Path(str(item.fspath)).parts:
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """An empty directory every user may reach and model units can see (pytest's tmp_path
    is under a 0700 one, and /tmp and /var/tmp are private to units)."""
    path = Path(tempfile.mkdtemp(prefix="llamad-test-", dir="/var/lib"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def tiny_config(tmp_path: Path) -> Config:
    """One tiny model, "tiny", in tmp_path/models; llamad's state in tmp_path/state."""
    return supervised.models_config(tmp_path, ["tiny"])


@pytest.fixture(scope="session")
def box() -> Iterator[rig.Box]:
    reason = rig.missing_requirements()
    if reason:
        if REQUIRE_BOX:
            pytest.fail(reason)
        pytest.skip(reason)
    with rig.Box() as b:
        yield b


@pytest.fixture(scope="session")
def assets(box: rig.Box) -> rig.Assets:
    return rig.Assets(box.workdir)


@pytest.fixture(scope="session")
def box_env(box: rig.Box) -> dict[str, str]:
    """Environment for host processes that talk to the box's systemd."""
    return {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": box.bus_address}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    left = rig.leftovers()
    if left:
        print("\nllamad rig: left behind after the run: " + ", ".join(left), file=sys.stderr)
        session.exitstatus = 1
