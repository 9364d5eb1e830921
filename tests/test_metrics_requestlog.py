"""The request record, the request log's fields, metrics from state changes, and load
progress text: the pure parts. tests/integration/test_observability.py runs them for real."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from helpers.supervised import Rig
from helpers.watch import eventually
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from llamad.api import progress
from llamad.catalog.catalog import scan
from llamad.config import Config
from llamad.http import record
from llamad.http.record import Record
from llamad.observe import metrics as metrics_module
from llamad.observe import requestlog
from llamad.observe.metrics import Metrics
from llamad.supervisor import unitspec
from llamad.supervisor.events import Cause, Change, State
from llamad.supervisor.scheduler import Load

S = State
# The tail of a llama-server chat stream with usage on; the answer talks about tokens.
STREAM = (
    b'data: {"choices":[{"delta":{"content":"\\"prompt_tokens\\": 999"}}]}\n\n'
    b'data: {"choices":[],"usage":{"completion_tokens":12,"prompt_tokens":31,'
    b'"total_tokens":43},"timings":{"cache_n":0,"prompt_n":31,"predicted_n":12}}\n\n'
    b"data: [DONE]\n\n")


def test_token_counts_survive_any_chunking() -> None:
    for size in (1, 3, 7, 64, len(STREAM)):
        rec = Record("POST", "/v1/chat/completions")
        for i in range(0, len(STREAM), size):
            rec.see(STREAM[i:i + size])
        assert (rec.prompt_tokens, rec.completion_tokens) == (31, 12), size
        assert rec.first_byte is not None


def test_the_end_of_a_streamed_answer_is_seen_in_any_chunking() -> None:
    body, end = STREAM.split(b"data: [DONE]")
    for size in (1, 5, len(STREAM)):
        rec = Record("POST", "/v1/chat/completions")
        for i in range(0, len(body), size):
            rec.see(body[i:i + size])
        assert not rec.complete
        for i in range(0, len(b"data: [DONE]" + end), size):
            rec.see((b"data: [DONE]" + end)[i:i + size])
        assert rec.complete, size
    rec = Record("POST", "/v1/messages")
    rec.see(b'event: content_block_stop\ndata: {}\n\nevent: message_stop\ndata: {}\n\n')
    assert rec.complete
    # The model's own text, inside JSON, cannot end the answer.
    rec = Record("POST", "/v1/chat/completions")
    rec.see(b'data: {"choices":[{"delta":{"content":"\\ndata: [DONE]"}}]}\n\n')
    assert not rec.complete


async def test_a_client_that_hangs_up_after_the_answer_got_it() -> None:
    """The openai client closes the connection once it has read `data: [DONE]`, while
    llamad may still wait for the backend to end its stream: that request succeeded, and
    one cut off before the end did not."""
    seen: list[Record] = []
    answered = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        rec = record.of(request)
        rec.model = "m"  # only requests to a model are recorded
        resp = record.TapResponse(rec)
        resp.content_type = "text/event-stream"
        await resp.prepare(request)
        await resp.write(STREAM if request.query.get("whole") else STREAM[:40])
        answered.set()
        await asyncio.sleep(60)  # the backend has not ended its stream yet
        return resp

    app = web.Application(middlewares=[record.middleware([seen.append])])
    app.router.add_post("/v1/chat/completions", handler)
    async with TestClient(TestServer(app)) as client:  # cancels handlers of gone clients
        for n, (whole, status) in enumerate((("1", 200), ("", record.CLIENT_GONE)), 1):
            answered.clear()
            resp = await client.post("/v1/chat/completions", params={"whole": whole})
            await resp.content.readexactly(len(STREAM) if whole else 40)
            await answered.wait()
            resp.close()  # hang up, as the client does
            def recorded(n: int = n) -> bool:
                return len(seen) == n
            await eventually("the request's record", recorded, timeout=10)
            assert seen[-1].status == status, whole


def test_token_counts_from_other_shapes() -> None:
    rec = Record("POST", "/v1/messages")
    rec.see(b'{"usage": {"input_tokens": 9, "output_tokens": 4}}')
    assert (rec.prompt_tokens, rec.completion_tokens) == (9, 4)
    rec = Record("POST", "/completion")
    rec.see(b'{"content": "x", "timings": {"prompt_n": 5, "predicted_n": 2}}')
    assert (rec.prompt_tokens, rec.completion_tokens) == (5, 2)
    rec = Record("POST", "/tokenize")
    rec.see(b'{"tokens": [1, 2, 3]}')
    assert (rec.prompt_tokens, rec.completion_tokens) == (None, None)


def test_request_log_fields_are_clean_and_hold_no_text() -> None:
    rec = Record("POST", "/v1/chat/\ncompletions", started=100.0)
    rec.model, rec.status, rec.code, rec.stream = "evil\nMODEL=x\x1b[31m", 503, "timeout", True
    rec.acquired, rec.first_byte, rec.ended = 100.25, 100.5, 101.0
    rec.see(b'{"usage": {"prompt_tokens": 3, "completion_tokens": 2}}')
    rec.first_byte = 100.5
    f = requestlog.fields(rec)
    assert f["MODEL"] == "evil\\nMODEL=x\\x1b[31m" and f["PATH"] == "/v1/chat/\\ncompletions"
    assert (f["QUEUE_MS"], f["TTFT_MS"], f["DURATION_MS"]) == ("250", "500", "1000")
    assert (f["PROMPT_TOKENS"], f["COMPLETION_TOKENS"]) == ("3", "2")
    assert f["STATUS"] == "503" and f["CODE"] == "timeout" and f["STREAM"] == "1"
    assert all(ch >= " " and ch != "\x7f" for v in f.values() for ch in v)
    assert f["MESSAGE"] == ("evil\\nMODEL=x\\x1b[31m POST /v1/chat/\\ncompletions 503 timeout "
                            "in 1000 ms, 3+2 tokens")
    bare = requestlog.fields(Record("GET", "/props", model="m", status=200))
    assert "PROMPT_TOKENS" not in bare and "TTFT_MS" not in bare and "CODE" not in bare


def entry(datagram: bytes) -> dict[str, str]:
    """One datagram of journald's native protocol (plain KEY=value lines) as a dict."""
    lines = datagram.decode().split("\n")
    assert lines[-1] == ""
    return dict(line.split("=", 1) for line in lines[:-1])


def test_journal_writer_sends_datagrams_and_never_waits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journald = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journald.bind(str(tmp_path / "socket"))
    writer = requestlog.JournalWriter(str(tmp_path / "socket"))
    writer(Record("POST", "/v1/completions", model="m\nMODEL=x", status=200,
                  ended=time.monotonic()))
    writer.note("llama-server@m.service", "llamad: context 4096 of 32768: ...")
    sent = [entry(journald.recv(65536)) for _ in range(2)]
    assert sent[0]["MODEL"] == "m\\nMODEL=x" and sent[0]["PRIORITY"] == "6"
    assert sent[0]["MESSAGE_ID"] == requestlog.MESSAGE_ID
    assert sent[0]["MESSAGE"].startswith("m\\nMODEL=x POST /v1/completions 200 in ")
    # A note is in the model's unit's journal, and no request: `MODEL=m` finds requests only.
    assert sent[1]["OBJECT_SYSTEMD_UNIT"] == "llama-server@m.service"
    assert "MODEL" not in sent[1] and sent[1]["MESSAGE_ID"] == requestlog.FIT_MESSAGE_ID
    # A journald that reads nothing: what its socket has no room for waits, in order, and
    # no call waits for it; beyond BACKLOG entries are dropped and counted.
    monkeypatch.setattr(requestlog, "BACKLOG", 1000)
    started = time.monotonic()
    for i in range(3000):
        writer(Record("POST", f"/{i}", model="m", status=200))
    assert time.monotonic() - started < 5
    assert writer.dropped > 0
    journald.setblocking(False)
    paths = []
    while True:
        try:
            paths.append(entry(journald.recv(65536))["PATH"])
        except BlockingIOError:
            writer.flush()  # the daemon's tick
            try:
                paths.append(entry(journald.recv(65536))["PATH"])
            except BlockingIOError:
                break
    assert len(paths) + writer.dropped == 3000
    assert len(paths) >= requestlog.BACKLOG  # all it kept, beyond what the socket holds
    assert paths == [f"/{i}" for i in range(len(paths))]  # in order, none lost before a drop
    writer.close()
    journald.close()


def test_journal_writer_without_journald_says_so_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    writer = requestlog.JournalWriter(str(tmp_path / "absent"))
    for _ in range(3):
        writer(Record("POST", "/v1/completions", model="m", status=200))
    assert [r.message for r in caplog.records].count(
        "cannot write the request log to the journal: [Errno 2] No such file or directory"
    ) == 1
    writer.close()


def changes(model: str, *moves: tuple[State, State, Cause, float]) -> list[Change]:
    return [Change(model, old, new, cause, "", at) for old, new, cause, at in moves]


def samples(m: Metrics) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    text = generate_latest(m.registry).decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_metrics_from_state_changes_and_requests() -> None:
    m = Metrics()
    for c in changes("a", (S.UNLOADED, S.STARTING, Cause.LOAD, 10.0),
                     (S.STARTING, S.LOADING, Cause.ACTIVE, 11.0),
                     (S.LOADING, S.READY, Cause.HEALTHY, 13.5),
                     (S.READY, S.STARTING, Cause.CRASH, 20.0),
                     (S.STARTING, S.LOADING, Cause.ACTIVE, 20.5),
                     (S.LOADING, S.READY, Cause.HEALTHY, 21.0),
                     # a suspect backend that comes back is no load
                     (S.READY, S.LOADING, Cause.SUSPECT, 30.0),
                     (S.LOADING, S.READY, Cause.HEALTHY, 31.0),
                     (S.READY, S.STOPPING, Cause.EVICT_MEMORY, 40.0),
                     (S.STOPPING, S.UNLOADED, Cause.STOPPED, 41.0),
                     (S.UNLOADED, S.STARTING, Cause.LOAD, 50.0),
                     (S.STARTING, S.FAILED, Cause.FAILED, 51.0)):
        m.on_change(c)
    for status, code in ((200, ""), (200, ""), (503, "queue_full"), (404, "")):
        m.on_request(Record("POST", "/v1/completions", model="a", status=status, code=code))
    got = samples(m)
    a = (("model", "a"),)
    assert got["llamad_model_load_duration_seconds_count"] == {a: 2}
    assert got["llamad_model_load_duration_seconds_sum"] == {a: 3.5 + 1.0}
    assert got["llamad_model_load_duration_seconds_bucket"][(("le", "1.0"), *a)] == 1
    assert got["llamad_evictions_total"] == {(("model", "a"), ("reason", "memory")): 1}
    assert got["llamad_model_restarts_total"] == {a: 1}
    assert got["llamad_model_failures_total"] == {a: 1}
    assert got["llamad_requests_total"] == {(("code", "200"), *a): 2, (("code", "503"), *a): 1,
                                            (("code", "404"), *a): 1}
    assert got["llamad_rejections_total"] == {(*a, ("reason", "queue_full")): 1}
    assert not any(name.endswith("_created") for name in got)


async def test_live_metrics_read_the_supervisor(tiny_config: Config) -> None:
    sup = Rig(tiny_config).sup
    m = Metrics(lambda: 7)
    m.watch(sup)
    slot = sup.slots["tiny"]
    sup._begin_start(slot, Load("tiny"))
    got = samples(m)
    tiny = ("model", "tiny")
    assert got["llamad_model_state"][(tiny, ("state", "starting"))] == 1
    assert got["llamad_model_state"][(tiny, ("state", "ready"))] == 0
    assert got["llamad_models"][(("state", "starting"),)] == 1
    assert got["llamad_model_requests_queued"] == {(tiny,): 0}
    assert got["llamad_model_memory_estimate_bytes"][(("memory", "ram"), tiny)] > 0
    assert got["llamad_open_connections"] == {(): 7}
    assert got["llamad_memory_available_bytes"][()] > 0
    assert got["process_resident_memory_bytes"][()] > 0
    # Rendering asks only ready models for their own metrics: none here.
    text = (await m.render()).decode()
    assert "llamacpp:" not in text and "llamad_model_metrics_up" in text
    await sup.close()


async def test_the_exposition_is_written_off_the_event_loop(
        tiny_config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    # With a thousand models the text takes ~0.2 s of pure Python to write: on the loop,
    # every request would wait for each scrape.
    sup = Rig(tiny_config).sup
    m = Metrics(lambda: 0)
    m.watch(sup)
    written_on: list[threading.Thread] = []
    real = generate_latest

    def generate(registry: Any) -> bytes:
        written_on.append(threading.current_thread())
        return real(registry)

    monkeypatch.setattr(metrics_module, "generate_latest", generate)
    text = (await m.render()).decode()
    assert "llamad_models" in text and "llamad_model_metrics_up" in text
    assert written_on and threading.main_thread() not in written_on
    await sup.close()


def test_progress_text() -> None:
    class Slotish:
        def __init__(self, state: State, started: float) -> None:
            self.state, self.load_started = state, started
            self.model = type("M", (), {"id": "gem\nma"})()
    now = 100.0
    assert progress.describe(Slotish(S.LOADING, 99.0), 4.0, now) == (  # type: ignore[arg-type]
        "loading gem\\nma 25% (1.0s of ~4.0s)")
    assert progress.describe(Slotish(S.STARTING, 90.0), 4.0, now).startswith(  # type: ignore[arg-type]
        "loading gem\\nma 99%")
    assert progress.describe(Slotish(S.STOPPING, 0.0), 4.0, now) == (  # type: ignore[arg-type]
        "waiting for gem\\nma (stopping)")


def test_model_units_serve_metrics_unless_the_preset_says_no(tmp_path: Path) -> None:
    from helpers import ggufgen
    from helpers.catalogs import age

    d = tmp_path / "m"
    for name in ("on", "off", "explicit"):
        ggufgen.write_model(d / f"{name}.gguf")
    age(d)
    preset = tmp_path / "presets.ini"
    preset.write_text("[off]\nmetrics = false\n[explicit]\nmetrics = true\n")
    cfg = Config.default(models_dirs=(d,), models_preset=preset, llama_cache=False)
    snap = scan(cfg)
    for name, want in (("on", 1), ("off", 0), ("explicit", 1)):
        argv = unitspec.build(cfg, snap.models[name], "tcp:127.0.0.1:1", (), None).argv
        assert argv.count("--metrics") == want, (name, argv)


def test_a_backends_metrics_cannot_pass_for_llamads() -> None:
    """security-review-3 M3: a model unit running hostile code answers /metrics with
    llamad_* families or label names the exposition cannot carry: dropped."""
    from llamad.observe.metrics import _parse
    text = ("# TYPE llamacpp:tokens counter\nllamacpp:tokens_total 5\n"
            "# TYPE llamad_requests counter\nllamad_requests_total{model=\"x\"} 1e9\n"
            "# TYPE odd gauge\nodd{model=\"other\"} 1\n")
    names = [f.name for f in _parse(text)]
    assert names and all(n.startswith("llamacpp:tokens") for n in names), names


async def test_what_llamad_reads_of_a_backend_is_bounded() -> None:
    import pytest
    from aiohttp import ClientSession, web
    from aiohttp.test_utils import TestServer

    from llamad.supervisor.backend import capped_json, read_capped

    async def big(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()  # chunked: no length to refuse it by
        await resp.prepare(request)
        for _ in range(64):
            await resp.write(b" " * 65536)
        return resp

    async def small(request: web.Request) -> web.Response:
        return web.json_response({"n": 1})
    app = web.Application()
    app.router.add_get("/big", big)
    app.router.add_get("/small", small)
    async with TestServer(app) as server, ClientSession() as s:
        async with s.get(server.make_url("/big")) as r:
            with pytest.raises(ValueError, match="larger than the 1048576 bytes"):
                await read_capped(r, 1 << 20)
        async with s.get(server.make_url("/small")) as r:
            assert await capped_json(r, 100) == {"n": 1}


async def test_only_a_models_answer_is_scanned_for_token_counts() -> None:
    """llamad's own answers (GET /v1/models of 10,000 models is 12 MB) are not scanned."""
    seen: list[Record] = []
    observe = record.middleware([seen.append])
    body = b'{"usage": {"prompt_tokens": 5, "completion_tokens": 1}}'

    async def own(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body)

    async def models(request: web.Request) -> web.StreamResponse:
        record.of(request).model = "m"
        return web.Response(body=body)
    mine = make_mocked_request("GET", "/v1/models")
    await observe(mine, own)
    assert record.of(mine).counts == {} and record.of(mine).first_byte is None and not seen
    theirs = make_mocked_request("POST", "/v1/completions")
    await observe(theirs, models)
    assert seen and seen[0].prompt_tokens == 5 and seen[0].completion_tokens == 1
