"""pytest plugin for llama.cpp's server tests run against llamad (loaded with -p plugin).

- The suite's session fixture downloads every preset's model first
  (ServerPreset.load_all); here the models are already in the offline cache, so that
  step is skipped, and the tmp directory it would create is made.
- The single-model test files start "llama-server" with one model and send requests
  that name none (a single-model server needs no name). llamad is a router, which needs
  one, as llama.cpp's router does: the client adds the model's name to a POST body or a
  GET query that lacks it. Router-mode tests (ServerPreset.router) are left as they are.
- A test running longer than $CONFORMANCE_TEST_TIMEOUT seconds fails, so that one stuck
  case cannot hold the run for the suite's ten-minute request timeout.
- The cases named in $CONFORMANCE_MODEL_BOUND (one per line) fail against llama-server
  itself with Gemma in place of the stories260K models: they run as expected failures, so
  that the log shows no FAILED that is not llamad's.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
import utils

utils.ServerPreset.load_all = staticmethod(lambda: None)
os.makedirs(utils.TMP_DIR, exist_ok=True)

ROUTED_GETS = ("/props", "/slots", "/metrics", "/lora-adapters")
_make_request = utils.ServerProcess.make_request
_make_stream_request = utils.ServerProcess.make_stream_request


def _name(server: Any) -> str | None:
    """The one model of a single-model server (None for a router)."""
    if not (server.model_file or server.model_hf_repo):
        return None
    if server.model_alias:  # "a,b,c": several aliases of the one model
        return str(server.model_alias).split(",")[0]
    return str(server.model_hf_repo or os.path.basename(server.model_file))


def _named(server: Any, method: str, path: str, data: Any) -> tuple[str, Any]:
    name = _name(server)
    if name is None:
        return path, data
    # "model": null names none, as an absent one does.
    if method == "POST" and isinstance(data, dict) and data.get("model") is None:
        data = {**data, "model": name}
    if method == "GET" and path.split("?")[0] in ROUTED_GETS and "model=" not in path:
        path += ("&" if "?" in path else "?") + "model=" + quote(name)
    return path, data


def make_request(self: Any, method: str, path: str, data: Any = None,
                 *args: Any, **kwargs: Any) -> Any:
    path, data = _named(self, method, path, data)
    return _make_request(self, method, path, data, *args, **kwargs)


def make_stream_request(self: Any, method: str, path: str, data: Any = None,
                        *args: Any, **kwargs: Any) -> Any:
    path, data = _named(self, method, path, data)
    return _make_stream_request(self, method, path, data, *args, **kwargs)


utils.ServerProcess.make_request = make_request
utils.ServerProcess.make_stream_request = make_stream_request


class TestTimeout(Exception):
    pass


def _expired(signum: int, frame: object) -> None:
    raise TestTimeout(f"the test ran past {os.environ['CONFORMANCE_TEST_TIMEOUT']} s")


def pytest_collection_modifyitems(items: list[Any]) -> None:
    bound = set(os.environ.get("CONFORMANCE_MODEL_BOUND", "").splitlines())
    for item in items:
        if item.nodeid in bound:
            item.add_marker(pytest.mark.xfail(
                reason="fails against llama-server too with Gemma (reference.json)"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: Any) -> Iterator[None]:
    limit = int(os.environ.get("CONFORMANCE_TEST_TIMEOUT", "0"))
    if limit:
        signal.signal(signal.SIGALRM, _expired)
        signal.alarm(limit)
    try:
        yield
    finally:
        signal.alarm(0)
