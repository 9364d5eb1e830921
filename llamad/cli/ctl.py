"""Commands that talk to the running llamad over its HTTP API: load, unload, logs, ps, top.

The address is --url, else $LLAMAD_URL, else llamad.socket's address, else http://<listen>
of the configuration; the API key, when llamad wants one, comes from $LLAMAD_API_KEY. The
key goes only where llamad is: to an address given on purpose, or to llamad.socket's while
systemd holds it (when the socket is stopped, any local user could listen there); never
through a proxy and never on to a redirect. Tables and lines are for people, --json for
scripts; what the server says is shown with control characters escaped (it must not drive
the terminal). Anything that goes wrong is one sentence (LlamadError).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import subprocess
import sys
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.client import HTTPResponse
from pathlib import Path
from typing import Any

from llamad.cli import ENV_KEY, ENV_URL
from llamad.config import load_config
from llamad.errors import OLLAMA_PREFIX, LlamadError
from llamad.safetext import one_line

TIMEOUT = 30.0
# Bytes read of one answer: /status of 10,000 loaded models is ~10 MiB. Whatever answers
# at --url may not be llamad, and an endless answer must not take the client's memory.
ANSWER_MAX = 64 << 20
ERROR_MAX = 64 << 10  # of an error's body
LINE_MAX = 1 << 20  # of one line of a stream: a journal entry, a progress line
# A stream that breaks midway (llamad stopped or was killed): reset, or a chunk cut short.
BROKEN = (OSError, http.client.HTTPException)


@dataclass(frozen=True)
class Client:
    """Where the client commands send their requests, and with which key."""

    base: str
    key: str | None

    @classmethod
    def make(cls, config_path: Path | None, url: str | None) -> Client:
        key = _key(os.environ.get(ENV_KEY) or None)
        given = url or os.environ.get(ENV_URL)
        if given:
            return cls(_base(given, "--url" if url else f"${ENV_URL}"), key)
        found = llamad_socket() if config_path is None else None
        if found is None:
            return cls("http://" + load_config(config_path).listen, key)
        listen, held = found
        if key and not held:
            raise LlamadError(f"llamad.socket is not listening, so whatever answers at "
                              f"{listen} may not be llamad; ${ENV_KEY} is not sent to it. "
                              "Start llamad.socket, or give --url to trust that address")
        return cls("http://" + listen, key)

    @contextlib.contextmanager
    def open(self, method: str, path: str, body: dict[str, Any] | None = None,
             timeout: float | None = TIMEOUT) -> Iterator[HTTPResponse]:
        """One request; an error of any kind becomes a LlamadError sentence."""
        req = urllib.request.Request(self.base + path, method=method,
                                     data=json.dumps(body).encode() if body else None)
        req.add_header("Content-Type", "application/json")
        if self.key:
            req.add_header("Authorization", f"Bearer {self.key}")
        try:
            resp = _OPENER.open(req, timeout=timeout)
        except urllib.error.HTTPError as e:
            raise LlamadError(self._refusal(e, path)) from None
        except (urllib.error.URLError, OSError) as e:
            why = getattr(e, "reason", e)
            why = why.strerror.lower() if isinstance(why, OSError) and why.strerror else why
            raise LlamadError(f"llamad is not running at {self.base} ({why}); start it with "
                              "`systemctl start llamad.socket`, or give --url or "
                              f"${ENV_URL}") from None
        with resp:
            yield resp

    def _refusal(self, e: urllib.error.HTTPError, path: str) -> str:
        try:
            error = json.loads(e.read(ERROR_MAX))["error"]
            if isinstance(error, str) and path.startswith(OLLAMA_PREFIX):
                # llamad's errors on Ollama's routes are Ollama's shape: no source to check.
                message, source = error, "llamad"
            else:
                message, source = str(error["message"]), error.get("source")
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            message, source = f"HTTP {e.code} {e.reason}", None
        message = one_line(message)
        if source != "llamad":
            # Every llamad error says it is llamad's: another program holds the port (a
            # llama-server on 8080, its default too) or stands in front of llamad.
            return (f"{self.base} answered {message!r} (HTTP {e.code}), not as llamad: "
                    "another program may hold llamad's port; `llamad check-config` says")
        if e.code == 401:
            return f"{message}; set ${ENV_KEY} to a key from llamad's api-keys-file"
        return message

    def get(self, path: str) -> dict[str, Any]:
        return self.ask("GET", path)

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.ask("POST", path, body)

    def delete(self, path: str) -> dict[str, Any]:
        return self.ask("DELETE", path)

    def ask(self, method: str, path: str, body: dict[str, Any] | None = None
            ) -> dict[str, Any]:
        """One request and its answer, read within ANSWER_MAX."""
        with self.open(method, path, body) as r:
            raw = r.read(ANSWER_MAX + 1)
        if len(raw) > ANSWER_MAX:
            raise LlamadError(f"{self.base} answered more than {ANSWER_MAX >> 20} MiB, which "
                              "llamad never does; another program may hold llamad's port")
        return self.answer(raw)

    def answer(self, raw: bytes) -> dict[str, Any]:
        """`raw` (already bounded) as the JSON object llamad sends; anything else is an
        error sentence."""
        try:
            found = json.loads(raw)
        except ValueError:
            found = None
        if not isinstance(found, dict):
            start = one_line(raw[:60].decode(errors="replace").strip())
            raise LlamadError(f'{self.base} answered "{start}", not llamad\'s JSON; another '
                              "program may hold llamad's port")
        return found

    @contextlib.contextmanager
    def expect(self, path: str) -> Iterator[None]:
        """Reading llamad's answer to `path`: a JSON object without the fields llamad
        always sends (another program's) is an error sentence, not a KeyError."""
        try:
            yield
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise LlamadError(f"{self.base} answered {path} without llamad's fields "
                              f"({type(e).__name__}: {one_line(str(e))[:60]}), so it is not "
                              "llamad's answer; another program may hold llamad's port"
                              ) from None

    def lines(self, resp: HTTPResponse) -> Iterator[bytes]:
        """The lines of a streamed answer, each at most LINE_MAX bytes."""
        while raw := resp.readline(LINE_MAX + 1):
            if len(raw) > LINE_MAX and not raw.endswith(b"\n"):
                raise LlamadError(f"{self.base} sent a line longer than {LINE_MAX >> 20} "
                                  "MiB, which llamad never does")
            yield raw


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """llamad never redirects: an answer that does is not followed (the key would go on to
    wherever it points), and becomes an error sentence (Client._refusal)."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


# No proxy from the environment either: the key is for llamad alone.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())


# What --url and $LLAMAD_URL may be: http(s)://HOST[:PORT], or HOST:PORT as $OLLAMA_HOST is.
_URL = re.compile(r"(https?://)?(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._-]+)(:\d{1,5})?"
                  r"(/[A-Za-z0-9._~%/-]*)?")


def _base(given: str, where: str) -> str:
    """The base URL of an address given on the command line or in the environment; a
    malformed one is a sentence (urllib would raise ValueError at the first request)."""
    m = _URL.fullmatch(given.strip())
    if m is None or (m[1] is None and m[3] is None) or (m[3] and int(m[3][1:]) > 65535):
        raise LlamadError(f"{where} {one_line(given)!r} is not llamad's address; give an "
                          "http:// URL such as http://127.0.0.1:8080 (or HOST:PORT)")
    # A path stays: llamad behind a reverse proxy under a prefix.
    return f"{m[1] or 'http://'}{m[2]}{m[3] or ''}{m[4] or ''}".rstrip("/")


def _key(key: str | None) -> str | None:
    """$LLAMAD_API_KEY as an HTTP header can carry it: printable ASCII, no spaces (never
    echoed: it is a secret)."""
    if key is not None and not re.fullmatch(r"[!-~]+", key):
        raise LlamadError(f"${ENV_KEY} holds spaces, control or non-ASCII characters, which "
                          "no key in llamad's api-keys-file has; set it to the key alone")
    return key


def llamad_socket() -> tuple[str, bool] | None:
    """llamad.socket's first address (an admin may have moved it with a drop-in) and
    whether it listens now (systemd holds the address: nobody else can); None without
    such a unit."""
    try:
        out = subprocess.run(["systemctl", "show", "-p", "Listen", "-p", "ActiveState",
                              "llamad.socket"],
                             capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    shown = dict(line.partition("=")[::2] for line in out.stdout.splitlines())
    listen = shown.get("Listen", "").split()
    if out.returncode != 0 or not listen:
        return None
    return listen[0], shown.get("ActiveState") == "active"


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def cmd_load(client: Client, model: str, wait: bool, timeout: float, as_json: bool) -> int:
    answer = client.post("/models/load", {"model": model})
    with client.expect("/models/load"):
        name, state = str(answer["model"]), str(answer["state"])
    if wait:
        answer["state"] = state = wait_ready(client, name, timeout)
    if as_json:
        _print_json(answer)
    else:
        print(one_line(f"{name}: {state}"))
    return 0


def wait_ready(client: Client, model: str, timeout: float) -> str:
    """Poll until the model is ready; a failure or the timeout is an error sentence."""
    deadline = time.monotonic() + timeout
    while True:
        status = client.get("/status")
        with client.expect("/status"):
            found = status["models"].get(model)
            state = str(found["state"]) if found else "unloaded"
            reason = str(found.get("reason")) if state == "failed" else ""
        if state in ("ready", "sleeping"):  # sleeping: loaded, its next request wakes it
            return state
        if state == "failed":
            raise LlamadError(f"model {model} failed to load: {one_line(reason)}")
        if time.monotonic() > deadline:
            raise LlamadError(f"model {model} is still {state} after {timeout:g}s")
        time.sleep(0.2)


def cmd_unload(client: Client, model: str, as_json: bool) -> int:
    answer = client.post("/models/unload", {"model": model})
    with client.expect("/models/unload"):
        said = f"{answer['model']}: {answer['state']}"
    if as_json:
        _print_json(answer)
    else:
        print(one_line(said))
    return 0


def cmd_logs(client: Client, model: str | None, follow: bool, lines: int,
             as_json: bool) -> int:
    """Journal lines of llamad, or of one model's unit, as /logs/stream sends them."""
    path = "/logs/stream" + (f"/{urllib.parse.quote(model, safe='/:')}" if model else "")
    query = f"?lines={lines}&follow={int(follow)}"
    with client.open("GET", path + query, timeout=None) as r:
        if r.headers.get_content_type() != "text/event-stream":
            raise LlamadError(f"{client.base} answered {path} with "
                              f"{one_line(r.headers.get_content_type())}, not llamad's "
                              "event stream; another program may hold llamad's port")
        for entry in _events(client, _unbroken(client, r)):
            print(json.dumps(entry) if as_json else _log_line(entry), flush=True)
    if follow:  # llamad never ends a followed stream but when it stops
        raise LlamadError(f"{client.base} stopped sending its log (llamad stopped?)")
    return 0


def _unbroken(client: Client, resp: HTTPResponse) -> Iterator[bytes]:
    """The stream's lines; a cut (llamad stopped) is a sentence. Only reading is covered:
    a closed stdout (`llamad logs | head`) is the reader's leaving, not llamad's."""
    try:
        yield from client.lines(resp)
    except BROKEN as e:
        raise LlamadError(f"{client.base} stopped sending its log ({e})") from None


def _events(client: Client, lines: Iterator[bytes]) -> Iterator[dict[str, Any]]:
    entry: dict[str, Any] = {}
    for raw in lines:
        line = raw.decode("utf-8", errors="replace").rstrip("\n")
        if line.startswith("id: "):
            entry["id"] = line[4:]
        elif line.startswith("data: "):
            entry.update(client.answer(raw[6:]))
        elif not line and entry:
            yield entry
            entry = {}


def _log_line(entry: dict[str, Any]) -> str:
    when = time.strftime("%b %d %H:%M:%S", time.localtime(entry.get("time") or 0))
    # Escaped: a log line must not drive the terminal.
    return one_line(f"{when} {entry.get('unit') or '-'}: {entry.get('message', '')}")


def cmd_ps(client: Client, as_json: bool, watch: float | None) -> int:
    """The daemon's loaded models; with `watch`, redrawn every `watch` seconds."""
    while True:
        status = client.get("/status")
        if as_json:
            print(json.dumps(status), flush=True)
        else:
            with client.expect("/status"):
                table = ps_table(status)
            if watch:
                sys.stdout.write("\x1b[H\x1b[2J")  # home, clear: a live table
            print("\n".join(table), flush=True)
        if not watch:
            return 0
        time.sleep(watch)


def ps_table(status: dict[str, Any]) -> list[str]:
    rows = [("MODEL", "STATE", "PID", "RAM", "VRAM", "ESTIMATE", "LOAD", "IN FLIGHT",
             "QUEUED", "SERVED", "TTL LEFT", "CONTEXT")]
    fits = []
    for model, d in sorted(status["models"].items()):
        ttl = "-" if d["ttl_left"] is None else f"{d['ttl_left']:.0f}s"
        load = "-" if d.get("load_seconds") is None else f"{d['load_seconds']:.1f}s"
        fit = d.get("fit") or {}
        rows.append((model, d["state"], str(d["main_pid"] or "-"), _mib(d.get("ram")),
                     _mib(d.get("vram")), _mib(d["estimate"]["ram"] + d["estimate"]["vram"]),
                     load, _in_flight(d), str(d.get("queued", 0)), str(d["served"]),
                     ttl, str(fit.get("ctx") or "-")))
        if fit.get("reason"):
            fits.append(one_line(f"{model}: {fit['reason']}"))
    # Escaped before measuring (what the terminal shows), measured in its columns.
    cells = [[one_line(c) for c in r] for r in rows]
    widths = [max(width(r[i]) for r in cells) for i in range(len(cells[0]))]
    out = ["  ".join(c + " " * (w - width(c)) for c, w in zip(r, widths, strict=True)).rstrip()
           for r in cells]
    out += fits  # what fitting chose for each model, and why
    out += [f"GPU {g['index']} {g['name']}: {_mib(g['used'])} used of {_mib(g['total'])}"
            for g in status.get("gpus", [])]
    return [*map(one_line, out), one_line(str(status["status"]))]


def width(text: str) -> int:
    """Terminal columns of `text`: East Asian wide and full-width characters take two,
    combining marks and format characters none (wcwidth's rules, roughly)."""
    return sum(0 if unicodedata.combining(c) or unicodedata.category(c) in ("Mn", "Me", "Cf")
               else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _in_flight(d: dict[str, Any]) -> str:
    """"1/2" under a concurrency limit of 2, else the count alone."""
    limit = d.get("concurrency_limit")
    return f"{d['in_flight']}/{limit}" if limit else str(d["in_flight"])


def _mib(n: int | None) -> str:
    return "-" if not n else f"{n / 2**20:.0f} MiB"
