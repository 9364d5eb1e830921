"""Ollama's request and answer shapes, to and from llama-server's own routes (pure functions).

Requests: /api/chat and /api/generate become a chat completion (`/v1/chat/completions`,
which applies the model's chat template, passes images to the projector and tools to the
template), /api/generate with `raw` becomes `/completion` and with `suffix` `/infill`;
`options` become llama.cpp's sampling fields, `format` its `json_schema`. Answers: each
event of llama-server's stream becomes one NDJSON line of Ollama's, its timings Ollama's
durations (nanoseconds) and counts. Shapes follow Ollama's api/types.go and docs/api.md.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from llamad.errors import BadRequest, LlamadError
from llamad.http.body import check_bounds

CHAT, GENERATE = "chat", "generate"
INT32_MAX = 2**31 - 1
CHAT_PATH, COMPLETION_PATH, INFILL_PATH = "/v1/chat/completions", "/completion", "/infill"
MAX_TOP_LOGPROBS = 20  # Ollama's bound

# Ollama option -> llama.cpp's field (server-schema.cpp).
SAMPLING = {
    "temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
    "typical_p": "typical_p", "repeat_last_n": "repeat_last_n",
    "repeat_penalty": "repeat_penalty", "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty", "seed": "seed", "num_predict": "n_predict",
    "num_keep": "n_keep", "mirostat": "mirostat", "mirostat_tau": "mirostat_tau",
    "mirostat_eta": "mirostat_eta",
}
# Options that set how a model is loaded (num_ctx, num_gpu, num_thread, ...) are left to the
# model's preset, as are unknown ones: Ollama too ignores what it does not know.
IMAGE_TYPES = (("iVBORw0KGgo", "image/png"), ("/9j/", "image/jpeg"), ("R0lGOD", "image/gif"),
               ("UklGR", "image/webp"), ("Qk", "image/bmp"))
# llama-server's finish reasons and /completion stop types -> Ollama's done_reason.
DONE_REASON = {"stop": "stop", "tool_calls": "stop", "length": "length", "eos": "stop",
               "word": "stop", "limit": "length"}


def now_iso() -> str:
    """Ollama's created_at: RFC 3339 in UTC."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def options(value: object, n_ctx: int | None = None) -> dict[str, Any]:
    """Ollama's `options` as llama.cpp's sampling fields; `n_ctx`: the tokens one request
    may use."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest('"options" must be an object')
    out: dict[str, Any] = {}
    for key, v in value.items():
        if v is None:
            continue
        if key == "stop":
            stops = [v] if isinstance(v, str) else v
            if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
                raise BadRequest('option "stop" must be a list of strings')
            out["stop"] = stops
        elif key in SAMPLING:
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise BadRequest(f"option {key!r} must be a number, not {v!r}")
            out[SAMPLING[key]] = v
    if not 0 < out.get("n_predict", 1) <= INT32_MAX:
        # No limit to Ollama (its runner counts only a positive num_predict; -2, "until the
        # context is full", is the same there, and it caps any at ten contexts):
        # llama-server's no limit is -1 alone; it stops 0 after one token and refuses -2
        # and more than an int32.
        out["n_predict"] = -1
    if out.get("repeat_last_n") == -1:  # Ollama's "the whole context"; llama-server's 400
        del out["repeat_last_n"]
        if n_ctx:
            out["repeat_last_n"] = n_ctx
    check_bounds(out)
    return out


def flag(key: str, value: object, default: bool) -> bool:
    """A true/false field (`stream`, `raw`): anything else is Ollama's 400 too, not a
    stream nobody asked for."""
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(f'"{key}" must be true or false, not {value!r}')
    return value


def output_format(value: object) -> dict[str, Any]:
    """`format`: "json" (a JSON object, as Ollama's own grammar) or a JSON schema."""
    if value is None or value == "":
        return {}
    if value == "json":
        return {"json_schema": {"type": "object"}}
    if isinstance(value, dict):
        return {"json_schema": value}
    raise BadRequest(f'"format" must be "json" or a JSON schema, not {value!r}')


def image_part(data: object) -> dict[str, Any]:
    """An Ollama image (base64, no data: prefix) as an OpenAI content part."""
    if not isinstance(data, str) or not data:
        raise BadRequest("each image must be a base64-encoded string")
    kind = next((t for prefix, t in IMAGE_TYPES if data.startswith(prefix)), "image/png")
    return {"type": "image_url", "image_url": {"url": f"data:{kind};base64,{data}"}}


def _tool_call(call: object) -> dict[str, Any]:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise BadRequest('each of "tool_calls" must be {"function": {"name", "arguments"}}')
    fn = call["function"]
    args = fn.get("arguments", {})
    return {"id": call.get("id") or "", "type": "function",
            "function": {"name": fn.get("name", ""),
                         "arguments": args if isinstance(args, str) else json.dumps(args)}}


def message(m: object) -> dict[str, Any]:
    """One Ollama message as an OpenAI one: images become content parts, tool calls carry
    their arguments as JSON text (their ids: _pair_calls)."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise BadRequest('each message must be an object with a "role"')
    content = m.get("content") or ""
    if not isinstance(content, str):
        raise BadRequest('a message\'s "content" must be a string')
    out: dict[str, Any] = {"role": m["role"], "content": content}
    images = m.get("images") or []
    if not isinstance(images, list):
        raise BadRequest('a message\'s "images" must be a list of base64 strings')
    if images:
        out["content"] = [{"type": "text", "text": content}, *map(image_part, images)]
    if m.get("tool_calls"):
        if not isinstance(m["tool_calls"], list):
            raise BadRequest('"tool_calls" must be a list')
        out["tool_calls"] = [_tool_call(c) for c in m["tool_calls"]]
    if m["role"] == "tool":
        out["tool_call_id"] = m.get("tool_call_id") or ""
        name = m.get("tool_name")
        out["name"] = name if isinstance(name, str) else ""
    if isinstance(m.get("thinking"), str) and m["thinking"]:
        out["reasoning_content"] = m["thinking"]
    return out


def _pair_calls(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ollama's clients send tool calls without ids and answer them by tool_name: each call
    gets an id (nine letters and digits, as Mistral's templates demand) and each answer the
    id of the call it answers (by name, else the first not yet answered), which templates
    that render ids need."""
    made = 0
    open_calls: list[tuple[str, str]] = []  # (name, id) of the last calls not yet answered
    for m in messages:
        for call in m.get("tool_calls", []):
            if not call["id"]:
                call["id"] = f"call{made:05d}"
                made += 1
        if m.get("tool_calls"):
            open_calls = [(c["function"]["name"], c["id"]) for c in m["tool_calls"]]
        if m["role"] == "tool":
            name = m.pop("name")
            if not m["tool_call_id"]:
                match = next((c for c in open_calls if c[0] == name), None) or \
                    (open_calls[0] if open_calls else (name, name or f"call{made:05d}"))
                m["tool_call_id"] = match[1]
            open_calls = [c for c in open_calls if c[1] != m["tool_call_id"]]
    return messages


def has_images(messages: list[Any]) -> bool:
    return any(isinstance(m, dict) and m.get("images") for m in messages)


THINK_LEVELS = ("high", "medium", "low")


def _think(value: object) -> dict[str, Any]:
    """`think` (true/false or a level) -> the template's enable_thinking switch; a level is
    llama-server's reasoning_effort too, which it hands to the template (gpt-oss reads it)."""
    if value is None:
        return {}
    if not isinstance(value, bool) and value not in THINK_LEVELS:
        raise BadRequest(f'"think" must be true, false, "high", "medium" or "low", not {value!r}')
    out: dict[str, Any] = {"chat_template_kwargs": {"enable_thinking": bool(value)}}
    if isinstance(value, str):
        out["reasoning_effort"] = value
    return out


def top_logprobs(req: dict[str, Any]) -> int | None:
    """How many alternatives a token's logprob comes with, if logprobs are asked for."""
    if not flag("logprobs", req.get("logprobs"), False):
        return None
    top = req.get("top_logprobs") or 0
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
        raise BadRequest(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}")
    return top


def chat_body(req: dict[str, Any], messages: list[Any], stream: bool,
              n_ctx: int | None = None) -> dict[str, Any]:
    """The /v1/chat/completions request for an Ollama chat (or a templated generate)."""
    body: dict[str, Any] = {"messages": _pair_calls([message(m) for m in messages]),
                            "stream": stream, **options(req.get("options"), n_ctx),
                            **output_format(req.get("format")), **_think(req.get("think"))}
    if stream:
        body["stream_options"] = {"include_usage": True}
    top = top_logprobs(req)
    if top is not None:  # llama-server gives the chosen token's logprob only with 1 or more
        body.update(logprobs=True, top_logprobs=max(top, 1))
    if req.get("tools"):
        if not isinstance(req["tools"], list):
            raise BadRequest('"tools" must be a list')
        body["tools"] = req["tools"]
    return body


def _unsupported(req: dict[str, Any], raw: bool, system: str) -> None:
    """What /api/generate cannot honour: an error, never dropped without a word."""
    template, context = req.get("template"), req.get("context")
    if raw and (system or template or context):
        raise BadRequest("raw mode does not support template, system, or context")  # Ollama's
    if template:  # Ollama's Go template language, in place of the model's own
        raise LlamadError("llamad does not apply a template sent with the request (Ollama's "
                          "Go templates): the model's own chat template applies; send "
                          "raw=true with the prompt already formatted", status=501,
                          code="not_supported")
    if context:  # token ids Ollama returned (deprecated); llamad never returns them
        raise LlamadError("llamad does not continue from a token context (and answers "
                          "without one): send the conversation as messages to /api/chat",
                          status=501, code="not_supported")


def generate_plan(req: dict[str, Any], stream: bool,
                  n_ctx: int | None = None) -> tuple[str, dict[str, Any]]:
    """Where an /api/generate with a prompt goes, and what it sends there."""
    prompt, suffix, system = (req.get(k) or "" for k in ("prompt", "suffix", "system"))
    images = req.get("images") or []
    if not all(isinstance(v, str) for v in (prompt, suffix, system)) \
            or not isinstance(images, list):
        raise BadRequest('"prompt", "suffix" and "system" must be strings, "images" a list')
    sampling = {"stream": stream, **options(req.get("options"), n_ctx),
                **output_format(req.get("format"))}
    top = top_logprobs(req)
    raw = flag("raw", req.get("raw"), False)
    _unsupported(req, raw, system)
    if top is not None and (suffix or raw):
        sampling["n_probs"] = max(top, 1)
    if suffix:
        return INFILL_PATH, {"input_prefix": prompt, "input_suffix": suffix, **sampling}
    if raw:
        if images:
            raise BadRequest("images need the model's chat template; send them without raw")
        return COMPLETION_PATH, {"prompt": prompt, **sampling}
    messages = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": prompt, "images": images}]
    return CHAT_PATH, chat_body(req, messages, stream, n_ctx)


STEP = 1 << 20  # bytes (or 1,024 runs of escapes) json_items counts between its yields
# Escapes in a string read_json found valid, and the text after each: 64 at most a match.
_ESCAPES = re.compile(rb'(?:\\.[^"\\]{0,256}){1,64}')


def json_items(raw: bytes | bytearray, most: int) -> Iterator[int]:
    """How many items a valid JSON text holds (',', '[' and '{' outside its strings),
    counted in short steps, each followed by the count so far; it stops past `most`."""
    items, pos, inside, since = 0, 0, False, 0
    while pos < len(raw) and items <= most:
        start = pos
        quote = raw.find(b'"', pos, pos + STEP)
        end = min(len(raw), pos + STEP) if quote < 0 else quote
        if inside and (slash := raw.find(b"\\", pos, end)) >= 0:  # escapes end no string
            pos = _ESCAPES.match(raw, slash).end()  # type: ignore[union-attr]
        else:
            if not inside:
                items += raw.count(b",", pos, end) + raw.count(b"[", pos, end) + \
                    raw.count(b"{", pos, end)
            pos, inside = (end, inside) if quote < 0 else (quote + 1, not inside)
        since += pos - start + STEP // 1024
        if since >= STEP:
            since = 0
            yield items
    yield items


def embed_inputs(value: object) -> list[str]:
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise BadRequest('"input" must be a string or a list of strings')


def shorten(vector: list[float], dimensions: object) -> list[float]:
    """Ollama's `dimensions`: the first N values, normalized again."""
    if dimensions is None or dimensions == 0:
        return vector
    if isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 0:
        raise BadRequest('"dimensions" must be a positive whole number')
    cut = vector[:dimensions]
    norm = math.sqrt(sum(v * v for v in cut)) or 1.0
    return [v / norm for v in cut]


def error_message(data: bytes) -> str:
    """The message of llama-server's error body ({"error": {"message"}}), else its text."""
    try:
        err = json.loads(data).get("error")
    except (ValueError, AttributeError):
        err = None
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return str(err["message"])
    if isinstance(err, str):
        return err
    return data[:300].decode(errors="replace").strip() or "the model's backend refused it"


def _ns(ms: object) -> int:
    return int(float(ms) * 1e6) if isinstance(ms, int | float) else 0


def _tool_calls(calls: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool calls gathered from llama-server, in Ollama's shape. Their arguments are an
    object (Ollama's clients take nothing else: ollama-python fails to validate the answer),
    none at all an empty one; anything else fails the answer, as Ollama's own llama-server
    runner fails it (llm/llama_server.go)."""
    out: list[dict[str, Any]] = []
    for _, call in sorted(calls.items()):
        fn = call.get("function") or {}
        text = fn.get("arguments") or ""
        try:
            args = json.loads(text) if text.strip() else {}
        except ValueError as e:
            args = e
        if not isinstance(args, dict):
            raise LlamadError("the model's backend returned invalid tool call arguments for "
                              f"{fn.get('name', '')!r} (not a JSON object): {text[:200]}",
                              status=500, code="backend_error")
        out.append({"id": call.get("id", ""), "function": {
            "index": len(out), "name": fn.get("name", ""), "arguments": args}})
    return out


@dataclass
class Reply:
    """One Ollama answer being made from llama-server's: its lines, then its last."""

    model: str  # the name as the client gave it, as Ollama echoes it
    kind: str  # CHAT or GENERATE
    stream: bool
    done_reason: str | None = None
    timings: dict[str, Any] = field(default_factory=dict)
    usage: dict[str, Any] = field(default_factory=dict)
    calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    top_logprobs: int | None = None  # logprobs asked for, with this many alternatives
    content: list[str] = field(default_factory=list)  # kept only when not streamed
    thinking: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)

    def line(self, content: str, thinking: str = "", calls: list[Any] | None = None,
             done: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "created_at": now_iso()}
        if self.kind == CHAT:
            msg: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                msg["thinking"] = thinking
            if calls:
                msg["tool_calls"] = calls
            out["message"] = msg
        else:
            out["response"] = content
            if thinking:
                out["thinking"] = thinking
            if calls:
                out["tool_calls"] = calls
        out["done"] = done
        return out

    def event(self, ev: dict[str, Any]) -> dict[str, Any] | None:
        """One event of llama-server's answer (or the whole answer): the Ollama line to
        send now, if any."""
        self.timings = ev.get("timings") or self.timings
        self.usage = ev.get("usage") or self.usage
        if "choices" in ev:
            return self._chat(ev)
        reason = ev.get("stop_type")
        if ev.get("stop") is True and isinstance(reason, str):
            self.done_reason = DONE_REASON.get(reason, "stop")
        self.usage = self.usage or ({"prompt_tokens": ev["tokens_evaluated"]}
                                    if "tokens_evaluated" in ev else {})
        return self._text(ev.get("content") or "", "", ev.get("completion_probabilities"))

    def _chat(self, ev: dict[str, Any]) -> dict[str, Any] | None:
        if not ev["choices"]:
            return None  # the usage event
        choice = ev["choices"][0]
        if choice.get("finish_reason"):
            self.done_reason = DONE_REASON.get(choice["finish_reason"], "stop")
        part = choice.get("delta") or choice.get("message") or {}
        for n, call in enumerate(part.get("tool_calls") or []):
            self._gather(call, n)
        return self._text(part.get("content") or "", part.get("reasoning_content") or "",
                          (choice.get("logprobs") or {}).get("content"))

    def _gather(self, call: dict[str, Any], n: int) -> None:
        """A tool call comes in pieces when streamed: its name, then its arguments' text."""
        have = self.calls.setdefault(call.get("index", n), {"function": {}})
        if call.get("id"):
            have["id"] = call["id"]
        fn = call.get("function") or {}
        if fn.get("name"):
            have["function"]["name"] = fn["name"]
        if isinstance(fn.get("arguments"), str):
            have["function"]["arguments"] = have["function"].get("arguments", "") + \
                fn["arguments"]

    def _text(self, content: str, thinking: str, probs: object = None) -> dict[str, Any] | None:
        logprobs = self._logprobs(probs)
        if not self.stream:
            self.content.append(content)
            self.thinking.append(thinking)
            self.logprobs += logprobs
            return None
        if not (content or thinking or logprobs):
            return None
        out = self.line(content, thinking)
        if logprobs:
            out["logprobs"] = logprobs
        return out

    def _logprobs(self, probs: object) -> list[dict[str, Any]]:
        """llama-server's token probabilities as Ollama's logprobs (without its token ids;
        without alternatives where none were asked for: llama-server needs one)."""
        if self.top_logprobs is None or not isinstance(probs, list):
            return []
        out = []
        for p in probs:
            entry = {k: p.get(k) for k in ("token", "logprob", "bytes")}
            if self.top_logprobs:
                entry["top_logprobs"] = [{k: t.get(k) for k in ("token", "logprob", "bytes")}
                                         for t in (p.get("top_logprobs") or [])[:self.top_logprobs]]
            out.append(entry)
        return out

    def last(self, total_s: float, load_s: float) -> list[dict[str, Any]]:
        """The closing lines: gathered tool calls (Ollama sends them whole), then done."""
        lines = []
        calls = _tool_calls(self.calls)
        if calls and self.stream:
            lines.append(self.line("", calls=calls))
        whole = self.line("".join(self.content), "".join(self.thinking),
                          None if self.stream else calls, done=True)
        whole["done_reason"] = self.done_reason or "stop"
        if not self.stream and self.top_logprobs is not None:
            whole["logprobs"] = self.logprobs
        whole.update(self.stats(total_s, load_s))
        return [*lines, whole]

    def stats(self, total_s: float, load_s: float) -> dict[str, int]:
        t, u = self.timings, self.usage
        prompt = u.get("prompt_tokens")
        if not isinstance(prompt, int):
            prompt = int(t.get("prompt_n", 0)) + int(t.get("cache_n", 0))
        evals = u.get("completion_tokens")
        if not isinstance(evals, int):
            evals = int(t.get("predicted_n", 0))
        return {"total_duration": int(total_s * 1e9), "load_duration": int(load_s * 1e9),
                "prompt_eval_count": prompt, "prompt_eval_duration": _ns(t.get("prompt_ms")),
                "eval_count": evals, "eval_duration": _ns(t.get("predicted_ms"))}
