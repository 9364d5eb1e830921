"""Ollama's API on llamad's port, so clients that speak only Ollama (its Python package,
LangChain's ChatOllama, editor plugins) work with no configuration beyond the URL.

Each request goes the way an OpenAI one does (proxy.proxied: the model is found, loaded and
held, the request is recorded and counted; API keys, limits and browser checks apply before
it), but is translated (ollama_translate.py) onto llama-server's own routes, and its answer
streamed back as Ollama's NDJSON, one line per event. Errors are Ollama's `{"error": "..."}`
(middleware.error_body, for every path under /api/), in a stream its last line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from llamad import redact
from llamad.api import listing
from llamad.api import ollama_models as models
from llamad.api import ollama_translate as tr
from llamad.api.forward import Upstream, Watch, exchange
from llamad.api.proxy import Send, proxied
from llamad.catalog.gguf_info import GGUFError
from llamad.errors import OLLAMA_PREFIX, BackendError, BadRequest, LlamadError, NotFound
from llamad.http import keys, record
from llamad.http.body import INLINE, parse_keep_alive, read_json
from llamad.http.context import find, supervisor, visible
from llamad.supervisor.backend import Backend
from llamad.supervisor.events import State
from llamad.supervisor.slot import Slot

# The Ollama release whose API this answers as (GET /api/version); clients check it.
VERSION = "0.12.0"
# A request body is decoded whole (messages, images, inputs): json.loads holds the event
# loop about 1 µs per item, so at most this many items. Only structure counts (',', '[' and
# '{' outside strings): a string is one item however long (its decoding is a copy), so a
# document or a CSV in a message, or thousands of texts to embed, are taken as by Ollama.
MAX_ITEMS = 50_000
MAX_EVENT = 8 * 1024 * 1024  # bytes of one event line from llama-server
# Inputs per /v1/embeddings request of /api/embed: at 4,096 dimensions about 1.3 MiB of
# JSON, decoded and encoded again in some 30 ms of the event loop.
EMBED_BATCH = 16
NDJSON = "application/x-ndjson"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def read_request(request: web.Request) -> dict[str, Any]:
    """The whole JSON body: first checked (body.read_json: size, time, grammar), then
    decoded, if it holds no more than MAX_ITEMS items."""
    raw, _ = await read_json(request)
    if len(raw) > INLINE:
        items = 0
        for count in tr.json_items(raw, MAX_ITEMS):  # in steps, between other work
            items = count
            await asyncio.sleep(0)
        if items > MAX_ITEMS:
            raise LlamadError(f"the request holds more than {MAX_ITEMS} JSON items (values "
                              "in arrays and objects), more than llamad translates for "
                              "Ollama's API; send fewer (or use the OpenAI-compatible "
                              "routes)", status=413, code="request_too_large")
    data: dict[str, Any] = json.loads(raw)  # read_json made sure it is a JSON object
    return data


async def model_slot(request: web.Request, req: dict[str, Any]) -> tuple[Slot, str]:
    """The model the request names, and the name as given (Ollama echoes it)."""
    name = req.get("model") or req.get("name")  # `name`: older clients
    if not isinstance(name, str) or not name:
        raise BadRequest("model is required", code="model_required")
    known = supervisor(request).snapshot.models
    for candidate in models.candidates(name, known):
        with contextlib.suppress(NotFound):
            return await find(request, candidate), name
    raise NotFound(f"model '{name}' not found")


def keep_alive_of(request: web.Request, req: dict[str, Any]) -> float | None:
    return keys.admins_say(request, parse_keep_alive(req.get("keep_alive")))


def _times(request: web.Request) -> tuple[float, float]:
    """Seconds since the request came, and of them waiting for the model."""
    rec = record.of(request)
    now = time.monotonic()
    return now - rec.started, (rec.acquired or now) - rec.started


# -- the handlers -------------------------------------------------------------------------

async def handle_version(request: web.Request) -> web.Response:
    return web.json_response({"version": VERSION})


async def handle_tags(request: web.Request) -> web.Response:
    sup = supervisor(request)
    return web.json_response({"models": [
        models.tag_entry(s.model) for s in visible(request, sup.models.values())
        if not s.model.hidden]})


async def handle_ps(request: web.Request) -> web.Response:
    sup = supervisor(request)
    return web.json_response(models.ps(sup, visible(request, sup.loaded_models())))


async def handle_show(request: web.Request) -> web.Response:
    req = await read_request(request)
    slot, _ = await model_slot(request, req)
    try:
        header = dict(await asyncio.to_thread(models.header, slot.model.path))
    except (OSError, GGUFError) as e:
        raise LlamadError(f"the file of model {slot.model.id} cannot be read: {e}") from e
    own = await asyncio.to_thread(models.own_template, slot.model.settings.args)
    sup = supervisor(request)
    n_ctx = listing.n_ctx(slot.model, sup.measure.run_args(slot.model))
    return web.json_response(models.show(slot.model, header, n_ctx, own))


async def handle_chat(request: web.Request) -> web.StreamResponse:
    req = await read_request(request)
    slot, name = await model_slot(request, req)
    keep_alive = keep_alive_of(request, req)
    stream = tr.flag("stream", req.get("stream"), True)  # Ollama streams unless told not to
    messages = req.get("messages") or []
    if not isinstance(messages, list):
        raise BadRequest('"messages" must be a list')
    if not messages:
        return await lifecycle(request, slot, tr.Reply(name, tr.CHAT, False), keep_alive)
    _check_images(slot, name, tr.has_images(messages))
    body = tr.chat_body(req, messages, stream, listing.n_ctx(slot.model))
    truncate = tr.flag("truncate", req.get("truncate"), True)  # a long history's oldest go
    return await answer(request, slot, keep_alive, tr.CHAT_PATH, body,
                        tr.Reply(name, tr.CHAT, stream, top_logprobs=tr.top_logprobs(req)),
                        body if truncate else None)


async def handle_generate(request: web.Request) -> web.StreamResponse:
    req = await read_request(request)
    slot, name = await model_slot(request, req)
    keep_alive = keep_alive_of(request, req)
    stream = tr.flag("stream", req.get("stream"), True)
    reply = tr.Reply(name, tr.GENERATE, stream, top_logprobs=tr.top_logprobs(req))
    if not (req.get("prompt") or req.get("suffix") or req.get("images")):
        reply.stream = False
        return await lifecycle(request, slot, reply, keep_alive)
    _check_images(slot, name, bool(req.get("images")))
    path, body = tr.generate_plan(req, stream, listing.n_ctx(slot.model))
    return await answer(request, slot, keep_alive, path, body, reply)


async def handle_embed(request: web.Request) -> web.StreamResponse:
    req = await read_request(request)
    slot, name = await model_slot(request, req)
    keep_alive = keep_alive_of(request, req)
    _check_embeds(slot, name)
    inputs = tr.embed_inputs(req.get("input"))
    dimensions = req.get("dimensions")
    tr.shorten([1.0], dimensions)  # a bad value is a 400 before anything loads
    fit = models.Fit(models.embed_limit(slot.model), tr.flag("truncate", req.get("truncate"), True))
    if not inputs:  # as Ollama: load the model, embed nothing
        await lifecycle(request, slot, tr.Reply(name, tr.GENERATE, False), keep_alive)
        return web.json_response({"model": name, "embeddings": []})
    return await proxied(request, slot, b"", keep_alive,
                         send=_embed_sender(name, inputs, dimensions, fit))


async def _ask(request: web.Request, backend: Backend, watch: Watch, path: str,
               body: dict[str, Any]) -> dict[str, Any]:
    """One JSON request to llama-server, its answer decoded; a refusal is an error."""
    async with exchange(request, backend, path, json.dumps(body).encode(), watch) as up:
        data = await up.read()
        if up.status != 200:
            raise _refused(up, data)
    return _decode(data)


async def _fitted(request: web.Request, backend: Backend, watch: Watch, texts: list[str],
                  fit: models.Fit) -> list[str]:
    """`texts`, each cut to `fit.limit` tokens (with the model's own BOS and EOS) as Ollama
    cuts them: tokens of the text alone, cut, written back as text. Only a text longer in
    bytes than the limit is asked about: a token is at least a byte."""
    out, specials = [], None
    for text in texts:
        if len(text.encode()) + 2 > fit.limit:  # perhaps too long: count its tokens
            if specials is None:
                specials = len((await _ask(request, backend, watch, "/tokenize", {
                    "content": "", "add_special": True})).get("tokens") or [])
            tokens = (await _ask(request, backend, watch, "/tokenize", {"content": text})
                      ).get("tokens") or []
            if len(tokens) + specials > fit.limit:
                if not fit.truncate:
                    raise BadRequest("the input length exceeds the context length")  # Ollama's
                text = (await _ask(request, backend, watch, "/detokenize", {
                    "tokens": tokens[:fit.limit - specials]})).get("content") or ""
        out.append(text)
    return out


def _embed_sender(name: str, inputs: list[str], dimensions: object, fit: models.Fit) -> Send:
    """Ollama's /api/embed, EMBED_BATCH inputs per request to llama-server, each batch's
    vectors written out before the next is asked for. Asked at once, 1,500 short inputs came
    back as 20 MiB of JSON, decoded and encoded again on the event loop: llamad grew by
    100 MiB and /health waited 2 s; up to MAX_ITEMS inputs, any client could hold it longer.
    Every input is fitted (or found too long) first, so that, as from Ollama, a refused
    input is an error answer, not one cut off after the first batches."""
    async def send(request: web.Request, backend: Backend, body: bytes | bytearray,
                   watch: Watch, out: web.StreamResponse) -> web.StreamResponse:
        out = out or web.StreamResponse()
        write = out.write_own if isinstance(out, record.TapResponse) else out.write
        texts, tokens = await _fitted(request, backend, watch, inputs, fit), 0
        for start in range(0, len(texts), EMBED_BATCH):
            try:
                answer = await _ask(request, backend, watch, "/v1/embeddings",
                                    {"input": texts[start:start + EMBED_BATCH]})
            except LlamadError as e:
                if not out.prepared:
                    raise  # nothing went out: the client gets the error (or it is retried)
                record.of(request).settle(e.status, e.code)
                if request.transport is not None:
                    request.transport.abort()  # never end a cut answer as if it were whole
                return out
            rows = sorted(answer.get("data") or [], key=lambda d: d.get("index", 0))
            tokens += (answer.get("usage") or {}).get("prompt_tokens", 0)
            vectors = ",".join(json.dumps(tr.shorten(r["embedding"], dimensions)) for r in rows)
            if not out.prepared:
                out.content_type = "application/json"
                await out.prepare(request)
                await write(b'{"model": ' + json.dumps(name).encode() + b', "embeddings": [')
            await write((("," if start else "") + vectors).encode())
        record.of(request).counts[b"prompt_tokens"] = tokens  # of all the batches
        total, load = _times(request)
        await write(f'], "total_duration": {int(total * 1e9)}, "load_duration": '
                    f'{int(load * 1e9)}, "prompt_eval_count": {tokens}}}'.encode())
        await out.write_eof()
        return out
    return send


async def handle_embeddings(request: web.Request) -> web.StreamResponse:
    """The older /api/embeddings: one prompt, its vector as the model makes it."""
    req = await read_request(request)
    slot, name = await model_slot(request, req)
    keep_alive = keep_alive_of(request, req)
    _check_embeds(slot, name)
    prompt = req.get("prompt") or ""
    if not isinstance(prompt, str):
        raise BadRequest('"prompt" must be a string')
    if not prompt:
        await lifecycle(request, slot, tr.Reply(name, tr.GENERATE, False), keep_alive)
        return web.json_response({"embedding": []})
    body = {"input": [prompt], "embd_normalize": -1}  # not normalized, as Ollama's
    return await proxied(request, slot, json.dumps(body).encode(), keep_alive,
                         send=_json_sender("/v1/embeddings", lambda data, *_: {
                             "embedding": (data.get("data") or [{}])[0].get("embedding", [])}))


def _check_images(slot: Slot, name: str, images: bool) -> None:
    info = slot.model.info
    if images and (info is None or "image" not in info.modalities):
        raise BadRequest(f"model '{name}' does not take images: it has no multimodal "
                         "projector (an mmproj file beside it)", code="images_not_supported")


def _check_embeds(slot: Slot, name: str) -> None:
    """Before the model is loaded (and others evicted) for a refusal from llama-server,
    which names its own flag."""
    if not models.embeds(slot.model):
        raise BadRequest(f"model '{name}' does not make embeddings: llamad starts it without "
                         "--embeddings (set embeddings = true in its preset)",
                         code="embeddings_not_supported")


# -- loading, unloading and answering ---------------------------------------------------------

async def lifecycle(request: web.Request, slot: Slot, reply: tr.Reply,
                    keep_alive: float | None) -> web.Response:
    """Ollama's request without a prompt: load the model (and apply keep_alive), or with
    keep_alive 0 unload it."""
    sup = supervisor(request)
    rec = record.of(request)
    rec.model = slot.model.id
    if keep_alive == 0:
        if slot.state is not State.UNLOADED:
            await sup.unload(slot)
        reason = "unload"
    else:
        async with sup.use(slot, keep_alive):
            rec.acquired = time.monotonic()
        reason = "load"
    line = reply.line("", done=True)
    line["done_reason"] = reason
    return web.json_response(line)


async def answer(request: web.Request, slot: Slot, keep_alive: float | None, path: str,
                 body: dict[str, Any], reply: tr.Reply,
                 history: dict[str, Any] | None = None) -> web.StreamResponse:
    """Send the translated request to the model as proxy.proxied sends any other."""
    resp = await proxied(request, slot, json.dumps(body).encode(), keep_alive,
                         send=_sender(path, reply, history))
    record.of(request).stream = reply.stream
    return resp


def _refused(up: Upstream, data: bytes) -> LlamadError:
    """llama-server refused the request: its status, its message."""
    return LlamadError(tr.error_message(data), status=up.status, code="backend_refused")


def _sender(path: str, reply: tr.Reply, history: dict[str, Any] | None = None) -> Send:
    """`history`: a chat's body, whose oldest messages may go if too long (_shorter)."""
    async def send(request: web.Request, backend: Backend, body: bytes | bytearray,
                   watch: Watch, out: web.StreamResponse) -> web.StreamResponse:
        for attempt in range(2):
            async with exchange(request, backend, path, bytes(body), watch) as up:
                if up.status == 200:
                    return await _answered(request, up, out, reply)
                data = await up.read()
            try:
                shorter = None if attempt or history is None else \
                    await _shorter(request, backend, watch, history, data)
            except BackendError:
                raise
            except LlamadError:  # no shorter prompt could be made: the refusal stands
                shorter = None
            if shorter is None:
                raise _refused(up, data)
            body = shorter
        raise AssertionError("a second refusal is raised above")
    return send


async def _answered(request: web.Request, up: Upstream, out: web.StreamResponse,
                    reply: tr.Reply) -> web.StreamResponse:
    if reply.stream and up.streamed:
        return await _stream(request, up, out, reply)
    reply.stream = False  # one answer, so one line
    data = await up.read()
    record.of(request).see(data)
    reply.event(_decode(data))
    return web.json_response(reply.last(*_times(request))[-1])


async def _shorter(request: web.Request, backend: Backend, watch: Watch,
                   chat: dict[str, Any], refusal: bytes) -> bytes | None:
    """Ollama's way with a history too long for the context (server/prompt.go, chatPrompt):
    the oldest messages go, but for system messages and the latest, until the prompt fits.
    Only once llama-server refused (its context comes with the refusal); at most log2 of the
    messages prompts are made and counted (/apply-template, /tokenize)."""
    budget, messages = models.prompt_budget(chat, refusal), chat["messages"]
    if budget is None or len(messages) < 2:
        return None  # not a context refusal, or nothing that may go

    async def fits(start: int) -> bool:
        kept = models.kept_messages(messages, start)
        prompt = (await _ask(request, backend, watch, "/apply-template",
                             {**chat, "messages": kept})).get("prompt") or ""
        tokens = (await _ask(request, backend, watch, "/tokenize", {
            "content": prompt, "add_special": True})).get("tokens") or []
        return len(tokens) + models.IMAGE_TOKENS * models.image_parts(kept) <= budget
    low, high = 1, len(messages) - 1  # the latest message stays, fitting or not
    while low < high:  # the first start that fits: fewer messages, fewer tokens
        mid = (low + high) // 2
        low, high = (low, mid) if await fits(mid) else (mid + 1, high)
    kept = models.kept_messages(messages, low)
    return None if len(kept) == len(messages) else json.dumps({**chat, "messages": kept}).encode()


def _json_sender(path: str, build: Callable[[dict[str, Any], float, float], dict[str, Any]]
                 ) -> Send:
    async def send(request: web.Request, backend: Backend, body: bytes | bytearray,
                   watch: Watch, out: web.StreamResponse) -> web.StreamResponse:
        async with exchange(request, backend, path, bytes(body), watch) as up:
            data = await up.read()
            if up.status != 200:
                raise _refused(up, data)
            record.of(request).see(data)
            return web.json_response(build(_decode(data), *_times(request)))
    return send


def _decode(data: bytes | bytearray) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise BackendError("the model's backend answered with something other than a JSON "
                           "object")
    if "error" in value:
        raise LlamadError(tr.error_message(bytes(data)), status=500, code="backend_error")
    return value


async def _stream(request: web.Request, up: Upstream, out: web.StreamResponse,
                  reply: tr.Reply) -> web.StreamResponse:
    """llama-server's server-sent events, as Ollama's lines. A failure once the lines have
    begun is the last line, `{"error": "..."}`, as Ollama ends a stream."""
    rec = record.of(request)
    out.content_type = NDJSON
    out.headers.update({"X-Accel-Buffering": "no", "Cache-Control": "no-cache"})
    await out.prepare(request)
    pending = bytearray()
    try:
        async for chunk in up.chunks():
            rec.see(chunk)  # the model's own answer, for the request log and the metrics
            pending += chunk
            while (end := pending.find(b"\n")) >= 0:
                line = bytes(pending[:end]).strip()
                del pending[:end + 1]
                if line.startswith(b"data: ") and line != b"data: [DONE]":
                    await _write(out, reply.event(_decode(line[6:])))
            if len(pending) > MAX_EVENT:
                raise BackendError("the model's backend sent an event longer than "
                                   f"{MAX_EVENT} bytes")
        if reply.done_reason is None:
            raise BackendError("the model's answer ended before it was complete")
        for last in reply.last(*_times(request)):
            await _write(out, last)
    except LlamadError as e:
        rec.settle(e.status, e.code)
        await _write(out, {"error": redact.text(e.message)})
    with contextlib.suppress(ConnectionResetError):  # the client has its last line
        await out.write_eof()
    return out


async def _write(out: web.StreamResponse, line: dict[str, Any] | None) -> None:
    if line is not None:
        data = json.dumps(line).encode() + b"\n"
        if isinstance(out, record.TapResponse):
            await out.write_own(data)  # the record saw llama-server's bytes instead
        else:
            await out.write(data)


# -- routes -------------------------------------------------------------------------------

def probe_or(page: Handler) -> Handler:
    """`/` answers Ollama's clients, which name themselves in User-Agent (`ollama/0.12.0
    (amd64 linux) Go/1.24`, `ollama-python/...`, `ollama-js/...`), and any HEAD (how Ollama's
    Go client checks that a server is up) as Ollama does: `Ollama is running`. Everyone
    else, browsers first, gets `page` (the web UI), as from llama-server."""
    async def root(request: web.Request) -> web.StreamResponse:
        agent = request.headers.get("User-Agent", "").lower()
        if request.method == "HEAD" or agent.startswith("ollama"):
            return web.Response(text="Ollama is running")
        return await page(request)
    return root


ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("GET", "version", handle_version),
    ("GET", "tags", handle_tags),
    ("POST", "show", handle_show),
    ("GET", "ps", handle_ps),
    ("POST", "chat", handle_chat),
    ("POST", "generate", handle_generate),
    ("POST", "embed", handle_embed),
    ("POST", "embeddings", handle_embeddings),
    # POST /api/pull and DELETE /api/delete (downloads) are added by the module that
    # downloads models, with the same error shape (every path under OLLAMA_PREFIX has it).
)


# Ollama's routes that build, copy or upload model files: llamad serves GGUF files as they
# are, so `ollama create`, `cp` and `push` are told what to do instead.
NOT_HERE = {
    "create": "llamad does not build models: put a GGUF file in models-dir (or pull one) and "
              "set its template and parameters in /etc/llamad/presets.ini",
    "copy": "llamad does not copy models: another name for a model is an alias in its preset "
            "(alias = NAME in /etc/llamad/presets.ini)",
    "push": "llamad does not upload models",
    "blobs/{digest}": "llamad does not take model files over HTTP: put the GGUF file in "
                      "models-dir",
}


def not_here(why: str) -> Handler:
    """A route of NOT_HERE: 501, with what to do instead."""
    async def handle(request: web.Request) -> web.StreamResponse:
        raise LlamadError(why, status=501, code="not_supported")
    return handle


def add_routes(app: web.Application) -> None:
    """Ollama's routes; GET ones answer HEAD too, as Ollama's do."""
    for method, name, handler in ROUTES:
        if method == "GET":
            app.router.add_get(OLLAMA_PREFIX + name, handler)
        else:
            app.router.add_route(method, OLLAMA_PREFIX + name, handler)
    for name, why in NOT_HERE.items():
        app.router.add_route("*", OLLAMA_PREFIX + name, not_here(why))
