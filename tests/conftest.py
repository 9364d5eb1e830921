"""Fixtures shared by all tests: the systemd box and the real assets."""

from __future__ import annotations

import asyncio
import gc
import inspect
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import rig
from helpers import supervised

from llamad.config import Config
from llamad.memory.gpu import GpuMonitor

# .ci/run sets this: there, a missing box is a failure, not a skip.
REQUIRE_BOX = os.environ.get("LLAMAD_REQUIRE_BOX") == "1"


# Seconds a test may take before pytest-timeout ends it (generous: the machine may be busy);
# a test that needs more says so with its own @pytest.mark.timeout.
TIMEOUTS = {"unit": 120, "integration": 900, "soak": 3600}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        kind = "unit"
        if "integration" in Path(str(item.fspath)).parts:
            item.add_marker(pytest.mark.integration)
            kind = "integration"
        if item.get_closest_marker("soak") is not None:
            kind = "soak"
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TIMEOUTS[kind]))


@pytest.fixture(autouse=True)
def _resources_closed() -> Iterator[None]:
    """What a test left unclosed (a socket, a client session) is found at its own end, not
    when the garbage collector happens to run during a later test: with warnings as errors,
    the ResourceWarning then fails the test that leaked."""
    yield
    gc.collect()


@pytest.fixture(autouse=True)
def _supervisors_closed(request: pytest.FixtureRequest,
                        monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """An asynchronous test that builds a Supervisor closes it: an open one has tasks that
    outlive it. (A synchronous test has no event loop to start any.)"""
    from llamad.supervisor.core import Core
    made: list[Core] = []
    init = Core.__init__

    def tracked(self: Core, *args: object, **kwargs: object) -> None:
        init(self, *args, **kwargs)  # type: ignore[arg-type]
        made.append(self)
    monkeypatch.setattr(Core, "__init__", tracked)
    yield
    if inspect.iscoroutinefunction(request.function):
        assert all(s._closed for s in made), "the test left a Supervisor open (close() it)"


@pytest.fixture(autouse=True)
async def _no_task_left() -> AsyncIterator[None]:
    """An asynchronous test ends what it started: a task still pending at its end would
    be destroyed with the event loop, its failure unseen."""
    yield
    others = asyncio.all_tasks() - {asyncio.current_task()}
    if others:  # handlers a server cancelled as it closed may need a few more steps to end
        await asyncio.wait(others, timeout=1.0)
    left = [t for t in others if not t.done()]
    for task in left:
        task.print_stack(file=sys.stderr)
        task.cancel()
    await asyncio.gather(*left, return_exceptions=True)
    assert not left, "tasks left running: " + ", ".join(
        f"{t.get_name()} ({t.get_coro()!r})" for t in left)


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


@pytest.fixture
async def make_rig() -> AsyncIterator[supervised.MakeRig]:
    """make_rig(config, gpus=None): a real Supervisor on the fake systemd (helpers/
    supervised.Rig); every one is closed after the test."""
    made: list[supervised.Rig] = []

    def make(config: Config, gpus: GpuMonitor | None = None) -> supervised.Rig:
        made.append(supervised.Rig(config, gpus))
        return made[-1]
    yield make
    for r in made:
        await r.close()


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


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        _failed(f"{report.nodeid} ({report.when})", crash.message if crash else "")


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed:
        _failed(f"{report.nodeid} (collect)", str(report.longrepr).strip().split("\n")[-1])


def _failed(what: str, why: str) -> None:
    """.ci/run names a file in LLAMAD_FAILED_LOG and prints it at its very end: a long CI
    log may be cut in the middle, where the unit and integration summaries are."""
    where = os.environ.get("LLAMAD_FAILED_LOG")
    if where:
        with open(where, "a", encoding="utf-8") as f:
            lines = why.strip().splitlines()[:40] or ["(no message)"]
            f.write(f"{what}: " + "\n    ".join(line[:300] for line in lines) + "\n")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    left = rig.leftovers()
    if left:
        print("\nllamad rig: left behind after the run: " + ", ".join(left), file=sys.stderr)
        _failed("the run", "left behind: " + ", ".join(left))
        session.exitstatus = 1
