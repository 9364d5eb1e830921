"""What a key scoped to some models learns of the others (security-review-3 L10): nothing
from /models/sse of models that left the catalog, nothing from how long a request waits."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from aiohttp.test_utils import make_mocked_request
from helpers.fakesystemd import FakeSystemd
from helpers.ggufgen import write_model
from helpers.nvml import NoNvml
from helpers.supervised import no_journal
from helpers.watch import Watch

from llamad.api.feed import ModelFeed
from llamad.catalog.catalog import scan
from llamad.config import Config
from llamad.errors import NotFound, Unavailable
from llamad.http import keys
from llamad.http.context import SUPERVISOR, find
from llamad.memory.gpu import GpuMonitor
from llamad.memory.measure import Measure
from llamad.supervisor.supervisor import Supervisor

NARROW = keys.Key(b"n", models=frozenset({"tiny"}))


def _sup(config: Config, rescans: list[float] | None = None) -> Supervisor:
    async def rescan() -> None:
        if rescans is not None:
            rescans.append(time.monotonic())
    meas = Measure(config, GpuMonitor(nvml=NoNvml()), state_dir=config.state_dir)
    return Supervisor(config, scan(config), FakeSystemd(Watch()), meas, no_journal, rescan=rescan)


def _request(sup: Supervisor, key: keys.Key | None) -> object:
    request = make_mocked_request("GET", "/models/sse", app={SUPERVISOR: sup})
    if key is not None:
        request[keys.REQUEST_KEY] = key
    return request


def test_events_of_models_that_left_reach_only_unscoped_keys(tiny_config: Config) -> None:
    sup = _sup(tiny_config)
    feed = ModelFeed(sup)
    scoped, plain = _request(sup, NARROW), _request(sup, keys.Key(b"p"))
    assert feed._visible(scoped, "tiny") and feed._visible(plain, "tiny")  # type: ignore[arg-type]
    # "secret-model" is not (or no longer) in the catalog: its name, cause and journal
    # detail went to every key.
    assert not feed._visible(scoped, "secret-model")  # type: ignore[arg-type]
    assert feed._visible(plain, "secret-model")  # type: ignore[arg-type]
    assert feed._visible(scoped, "*")  # type: ignore[arg-type]  # catalog reloads: no name


async def test_a_scoped_key_does_not_wait_for_a_name_outside_its_scope(
        tiny_config: Config, tmp_path: Path) -> None:
    """A file being copied in is waited for (up to queue-timeout) before a 404: to a key
    that may not use that name, the wait told that the name was coming."""
    models = tiny_config.models_dirs[0]
    write_model(models / "coming.gguf")  # modified just now: settling
    config = Config(**{**tiny_config.__dict__, "queue_timeout": 1.5})
    rescans: list[float] = []
    sup = _sup(config, rescans)
    try:
        assert "coming" in sup.snapshot.settling
        began = time.monotonic()
        with pytest.raises(NotFound):
            await find(_request(sup, NARROW), "coming")  # type: ignore[arg-type]
        assert time.monotonic() - began < 0.2 and rescans == []
        # A key that may use the name still waits for the file, here until queue-timeout
        # (the stand-in rescan never finds it complete).
        began = time.monotonic()
        with pytest.raises(Unavailable, match="timed out waiting for the file of model coming"):
            await find(_request(sup, keys.Key(b"p")), "coming")  # type: ignore[arg-type]
        assert rescans and time.monotonic() - began >= 1.4
    finally:
        await sup.close()
