"""/metrics and the logs as an operator meets them: llama-server's own metric names, an
exposition every Prometheus parser takes, log lines a terminal cannot reorder."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import pytest
from aiohttp import web
from helpers.supervised import serving
from prometheus_client import CollectorRegistry, generate_latest

from llamad.http.record import Record
from llamad.log import _clean, client_faults, setup_logging
from llamad.observe import metrics, requestlog
from llamad.observe.metrics import Metrics

# What the pinned llama-server answers on /metrics with --metrics (abridged, verbatim).
LLAMA_SERVER = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed, excluding cached tokens
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 2
# HELP llamacpp:n_decode_total Total number of llama_decode() calls
# TYPE llamacpp:n_decode_total counter
llamacpp:n_decode_total 4
# HELP llamacpp:n_tokens_max Largest observed sequence length (prompt + generation)
# TYPE llamacpp:n_tokens_max counter
llamacpp:n_tokens_max 5
# HELP llamacpp:requests_processing Number of requests processing
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 0
"""
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)", re.M)


def exposition(backends: dict[str, str]) -> str:
    """The whole /metrics text: llamad's own series, then the backends' as render() adds
    them."""
    extra = CollectorRegistry()
    extra.register(metrics._Fixed(metrics.passthrough(list(backends.items()))))
    return (generate_latest(Metrics().registry) + generate_latest(extra)).decode()


def typed(text: str) -> dict[str, str]:
    """Each TYPE line's name and type; a name announced twice fails (Prometheus' own
    parser, promtool's, refuses the whole page)."""
    out: dict[str, str] = {}
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        assert name not in out, f"second TYPE line for {name}"
        out[name] = kind
    return out


def family_of(sample: str, types: dict[str, str]) -> str | None:
    """The announced family a sample line belongs to, as Prometheus' text parser reads it."""
    for suffix in ("", "_bucket", "_sum", "_count", "_created"):
        base = sample.removesuffix(suffix) if suffix else sample
        if base in types and (not suffix or sample.endswith(suffix)):
            return base
    return None


def test_llama_servers_metric_names_arrive_as_llama_server_writes_them() -> None:
    """`llamacpp:n_tokens_max` is what llama-server's own /metrics (and every dashboard
    built on it) calls it; prometheus_client's parser renamed it `..._total`."""
    text = exposition({"a": LLAMA_SERVER, "b": LLAMA_SERVER})
    assert 'llamacpp:n_tokens_max{model="a"} 5.0' in text
    assert "n_tokens_max_total" not in text
    assert 'llamacpp:prompt_tokens_total{model="b"} 2.0' in text
    types = typed(text)
    assert types["llamacpp:prompt_tokens_total"] == "counter"
    for sample in _SAMPLE.findall(text):
        assert family_of(sample, types), f"{sample} has no TYPE line of its own"


def test_a_backend_cannot_announce_a_family_llamad_writes() -> None:
    """A model unit answering /metrics with process_* (or any family but llama-server's
    llamacpp:*) made a second `# TYPE process_cpu_seconds_total` line: promtool check
    metrics, and every parser built on Prometheus' expfmt, refused the whole page."""
    hostile = ("# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 5\n"
               "# TYPE python_info gauge\npython_info{version=\"x\"} 1\n"
               "# TYPE odd gauge\nodd 1\n" + LLAMA_SERVER)
    text = exposition({"m": hostile})
    typed(text)
    assert 'process_cpu_seconds_total{model="m"}' not in text and "odd" not in text
    assert 'llamacpp:requests_processing{model="m"} 0.0' in text


BIDI = "\u202e\u2066\u200f\u2028\u2029"


def test_log_lines_show_bidi_and_line_separators_escaped() -> None:
    """A model file named `x\u202eevil.gguf` (the catalog takes it: no control character)
    reordered the rest of llamad's log line in a terminal, Trojan-Source style; U+2028
    and U+2029 are line breaks to Unicode-aware readers (Python's splitlines)."""
    record = logging.LogRecord("llamad", logging.INFO, __file__, 1, "model %s loaded",
                               (f"x{BIDI}y",), None)
    assert _clean(record)
    assert record.getMessage() == "model x\\u202e\\u2066\\u200f\\u2028\\u2029y loaded"
    assert record.getMessage().splitlines() == [record.getMessage()]


def test_the_request_logs_message_shows_bidi_escaped_and_keeps_the_model_field() -> None:
    """MESSAGE is what journalctl prints; MODEL= stays the model's name, so that
    `journalctl MODEL=<name>` still finds its requests."""
    rec = Record("POST", "/v1/\u202ecompletions", model=f"x{BIDI}y", status=200)
    f = requestlog.fields(rec)
    assert f["MESSAGE"].startswith("x\\u202e\\u2066\\u200f\\u2028\\u2029y POST "
                                   "/v1/\\u202ecompletions 200 in ")
    assert f["MODEL"] == f"x{BIDI}y"


async def test_a_model_without_metrics_is_not_reported_down(tmp_path: Path) -> None:
    """A preset's `metrics = false` starts llama-server without --metrics: its /metrics is
    a 501 by design, yet llamad asked it at every scrape and said
    llamad_model_metrics_up 0, as for a stuck backend (an alert on it fired for good)."""
    preset = tmp_path / "presets.ini"
    preset.write_text("[off]\nmetrics = false\n")
    async with serving(tmp_path, ("on", "off"), models_preset=preset) as rig:
        for name in ("on", "off"):
            await rig.ready(name)
        families = await metrics.model_metrics(rig.sup.loaded_models())
    up = {s.labels["model"]: s.value for s in families["llamad_model_metrics_up"].samples}
    assert up == {"on": 0.0}  # the fake llama-server here has no /metrics


BAD_REQUESTS = (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")


async def test_a_malformed_request_is_one_log_line_without_a_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    """aiohttp logged each at ERROR with a traceback: under systemd every line of it is a
    journal entry, so any client could push llamad's own lines past journald's rate limit."""
    async def ok(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    setup_logging()
    try:
        for raw in BAD_REQUESTS:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(raw)
            assert (await asyncio.wait_for(reader.read(12), 10)).endswith(b" 400")
            writer.close()
    finally:
        logging.getLogger("aiohttp.server").removeFilter(client_faults)
        await runner.cleanup()
    got = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert len(got) == len(BAD_REQUESTS), got
    assert all(r.levelno == logging.INFO and r.exc_info is None for r in got)
    assert got[0].getMessage() == "refused a malformed HTTP request: Duplicate Content-Length"
