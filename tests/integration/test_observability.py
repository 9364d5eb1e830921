"""Metrics scraped by a real Prometheus, the request log in the real journal, and load
progress in streams read by the official openai client: llamad in the box."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import aiohttp
import openai
import rig
from helpers.daemon import Factory, Llamad, chat, request_log, stream, wait_state
from helpers.ports import free_port
from prometheus_client.parser import text_string_to_metric_families

PROMPT = "Tell a long story."  # what stream() sends; it must never reach the journal


@contextlib.contextmanager
def prometheus(d: Llamad) -> Iterator[str]:
    """Debian's prometheus, in the box, scraping `d` every second; yields its URL."""
    port = free_port()
    home = d.dir / f"prometheus-{port}"
    home.mkdir()
    (home / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: llamad\n    static_configs: [{{targets: ['127.0.0.1:{d.port}']}}]\n")
    unit = f"prometheus-{port}.service"
    d.box.run(["systemd-run", f"--unit={unit}", "prometheus",
               f"--config.file={home}/prometheus.yml", f"--storage.tsdb.path={home}/data",
               f"--web.listen-address=127.0.0.1:{port}"])
    url = f"http://127.0.0.1:{port}"
    try:
        rig.wait_for("prometheus to be ready", lambda: _get(url + "/-/ready") is not None)
        yield url
    finally:
        d.box.run(["systemctl", "stop", unit], check=False)


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return bytes(r.read())
    except OSError:
        return None


def promql(url: str, query: str) -> dict[str, float]:
    """An instant query's result: {"label=value,...": value}."""
    body = _get(url + "/api/v1/query?" + urllib.parse.urlencode({"query": query}))
    assert body is not None
    result = json.loads(body)["data"]["result"]
    hidden = ("instance", "job", "__name__")
    return {",".join(f"{k}={v}" for k, v in sorted(r["metric"].items()) if k not in hidden):
            float(r["value"][1]) for r in result}


def wait_promql(url: str, query: str, want: dict[str, float], timeout: float = 30) -> None:
    seen: list[dict[str, float]] = []

    def probe() -> bool:
        seen[:] = [promql(url, query)]
        return seen[0] == want
    try:
        rig.wait_for(f"{query} to be {want}", probe, timeout=timeout)
    except TimeoutError as e:
        raise AssertionError(f"{query}: {seen[0]}, wanted {want}") from e


def scrape(d: Llamad) -> dict[str, list[Any]]:
    """llamad's /metrics: family name -> samples."""
    with urllib.request.urlopen(d.url + "/metrics", timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


async def test_prometheus_counts_requests_and_loads(llamad_factory: Factory) -> None:
    d = llamad_factory(["gemma-a", "gemma-b"])
    with prometheus(d) as prom:
        async with aiohttp.ClientSession() as s:
            for _ in range(3):
                assert (await chat(s, d.url, "gemma-a"))[0] == 200
            wait_promql(prom, 'sum by (model) (llamad_requests_total{model="gemma-a"})',
                        {"model=gemma-a": 3})
            wait_promql(prom, "llamad_model_load_duration_seconds_count",
                        {"model=gemma-a": 1})
            # A second load is a second sample.
            async with s.post(d.url + "/models/unload", json={"model": "gemma-a"}) as r:
                assert r.status == 200
            wait_state(d.url, "gemma-a", "unloaded")
            assert (await chat(s, d.url, "gemma-a"))[0] == 200
        wait_promql(prom, "llamad_model_load_duration_seconds_count", {"model=gemma-a": 2})
        wait_promql(prom, "sum by (model) (llamad_requests_total)", {"model=gemma-a": 4})
        wait_promql(prom, "llamad_evictions_total", {"model=gemma-a,reason=unload": 1})
        # The model's own llama-server metrics, merged with a model label.
        wait_promql(prom, 'count by (model) ({__name__=~"llamacpp:.+"}) > 0',
                    {"model=gemma-a": promql(prom, 'count({__name__=~"llamacpp:.+"})')[""]})
        assert promql(prom, 'llamacpp:tokens_predicted_total')["model=gemma-a"] > 0
        assert promql(prom, 'llamad_model_state{state="ready"}') == {
            "model=gemma-a,state=ready": 1}
    # Scraping never loaded gemma-b, and an unloaded model adds nothing.
    assert d.model_units() == {"llama-server@gemma-a.service": "active"}
    assert d.starts("gemma-b") == 0


async def test_metrics_of_a_stuck_backend_are_left_out_in_time(
        llamad_factory: Factory) -> None:
    d = llamad_factory(["gemma-a"])
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, d.url, "gemma-a"))[0] == 200
    families = scrape(d)
    assert [x.value for x in families["llamad_model_metrics_up"]] == [1.0]
    assert families["llamacpp:prompt_tokens"][0].labels == {"model": "gemma-a"}
    assert {x.labels["memory"] for x in families["llamad_model_memory_estimate_bytes"]} == {
        "ram", "vram"}
    assert families["process_resident_memory_bytes"][0].value > 0
    unit = "llama-server@gemma-a.service"
    d.box.run(["systemctl", "kill", "--signal=SIGSTOP", unit])
    try:
        began = time.monotonic()
        families = scrape(d)
        took = time.monotonic() - began
    finally:
        d.box.run(["systemctl", "kill", "--signal=SIGCONT", unit])
    assert [x.value for x in families["llamad_model_metrics_up"]] == [0.0]
    assert "llamacpp:prompt_tokens" not in families
    assert took < 4, f"the scrape waited {took:.1f}s for a stuck model"


async def test_request_log_entries_in_the_journal(llamad_factory: Factory) -> None:
    d = llamad_factory(["gemma-a"])
    async with aiohttp.ClientSession() as s:
        status, body = await chat(s, d.url, "gemma-a", max_tokens=5, ignore_eos=True)
        assert status == 200, body
        events = await stream(s, d.url, "gemma-a", max_tokens=7)
        assert events[-1] == {"done": True}
        assert (await chat(s, d.url, "nope"))[0] == 404  # no model: not a model's request
    def two_entries() -> list[dict[str, Any]] | None:
        entries = request_log(d, "MODEL=gemma-a")
        return entries if len(entries) == 2 else None
    entries = rig.wait_for("two request log entries", two_entries)
    plain, streamed = entries
    for entry, completion in ((plain, 5), (streamed, 7)):
        assert entry["STATUS"] == "200" and entry["PATH"] == "/v1/chat/completions"
        assert int(entry["COMPLETION_TOKENS"]) == completion
        assert int(entry["PROMPT_TOKENS"]) > 0
        queue, ttft, total = (int(entry[k]) for k in ("QUEUE_MS", "TTFT_MS", "DURATION_MS"))
        assert 0 <= queue <= ttft <= total
        assert entry["MESSAGE"].startswith("gemma-a POST /v1/chat/completions 200 in ")
        assert PROMPT not in json.dumps(entry) and "Hi" not in entry["MESSAGE"]
    assert plain["STREAM"] == "0" and streamed["STREAM"] == "1"
    # The first request waited for the load; the second found the model ready.
    assert int(plain["QUEUE_MS"]) > int(streamed["QUEUE_MS"])
    assert len(request_log(d, "MESSAGE_ID=0f1c8d3ad0e54c6c9e1b8f7a62d5b4e3")) == 2


async def test_request_log_off(llamad_factory: Factory) -> None:
    d = llamad_factory(["gemma-a"], **{"request-log": "no"})
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, d.url, "gemma-a"))[0] == 200
    rig.wait_for("llamad to log the load", lambda: "ready after" in d.log())
    assert request_log(d, "MODEL=gemma-a") == []


async def sse_lines(s: aiohttp.ClientSession, url: str, model: str,
                    stream_it: bool = True) -> list[str]:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4, "stream": stream_it}
    async with s.post(url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200
        return [line.decode().rstrip("\n") async for line in r.content if line.strip()]


async def test_cold_stream_gets_load_progress(llamad_factory: Factory) -> None:
    d = llamad_factory(["gemma-a", "gemma-b"])
    async with aiohttp.ClientSession() as s:
        lines = await sse_lines(s, d.url, "gemma-a")
        first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
        progress = [line for line in lines[:first_data] if line.startswith(": ")]
        assert progress, lines[:first_data]
        assert progress[0].startswith((": loading gemma-a", ": waiting for gemma-a"))
        assert lines[-1] == "data: [DONE]"
        assert not any(line.startswith(":") for line in lines[first_data:])
        # Ready: no progress. Not streamed: a plain JSON body, even when cold.
        lines = await sse_lines(s, d.url, "gemma-a")
        assert lines[0].startswith("data: ")
        cold = await sse_lines(s, d.url, "gemma-b", stream_it=False)
        assert json.loads("".join(cold))["object"] == "chat.completion"
        async with s.post(d.url + "/models/unload", json={"model": "gemma-a"}) as r:
            assert r.status == 200
    wait_state(d.url, "gemma-a", "unloaded")
    # The official client reads a cold stream with progress comments in it.
    client = openai.OpenAI(base_url=d.url + "/v1", api_key="none", max_retries=0)
    chunks = await asyncio.to_thread(lambda: list(client.chat.completions.create(
        model="gemma-a", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
        stream=True)))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


async def test_load_progress_off(llamad_factory: Factory) -> None:
    d = llamad_factory(["gemma-a"], **{"load-progress": "no"})
    async with aiohttp.ClientSession() as s:
        lines = await sse_lines(s, d.url, "gemma-a")
    assert lines[0].startswith("data: ") and not any(line.startswith(":") for line in lines)
