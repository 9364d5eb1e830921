"""`llamad pull user/repo[:QUANT]` and `llamad rm MODEL`: downloads into llama.cpp's cache and
removals, through the running llamad (which runs each in a systemd unit of its own).

pull follows Ollama's /api/pull progress lines: a bar per file on a terminal, one line per
file otherwise. Interrupting it leaves the download running (`journalctl -u
'llamad-download@*'`); `llamad rm` stops and removes it.
"""

from __future__ import annotations

import json
import sys
import urllib.parse
from http.client import HTTPResponse
from typing import Any, TextIO

from llamad.cli.ctl import BROKEN, Client
from llamad.errors import LlamadError
from llamad.safetext import one_line

READ_TIMEOUT = 600.0  # seconds without a progress line before pull gives up waiting
BAR = 30


def cmd_pull(client: Client, name: str, as_json: bool, out: TextIO = sys.stdout) -> int:
    bars = Bars(out, out.isatty() and not as_json)
    # Through Client.open like every command: no proxy, no redirect, errors as sentences.
    with client.open("POST", "/api/pull", {"model": name, "stream": True},
                     timeout=READ_TIMEOUT) as resp:
        model = resp.headers.get("X-Llamad-Model") or name
        try:
            last = _follow(client, resp, name, bars, as_json, out)
        except BrokenPipeError:  # stdout's reader left (`| head`): not llamad's doing
            raise
        except BROKEN as e:
            last, why = {}, f" ({e})"
        else:
            why = ""
        bars.end()
    if last.get("status") != "success":  # Ollama's last line: anything else was cut short
        raise LlamadError(f"llamad stopped answering while pulling {name}{why}; the download "
                          "may go on: journalctl -u 'llamad-download@*'")
    if not as_json:
        print(f"{model}: in the cache; llamad serves it as {model}", file=out)
    return 0


def _follow(client: Client, resp: HTTPResponse, name: str, bars: Bars, as_json: bool,
            out: TextIO) -> dict[str, Any]:
    """Show the progress lines as they come; the last one."""
    record: dict[str, Any] = {}
    for raw in client.lines(resp):
        record = client.answer(raw)
        if as_json:
            print(json.dumps(record), file=out, flush=True)
        if "error" in record:
            bars.end()
            raise LlamadError(f"pulling {name} failed: {one_line(str(record['error']))}")
        if not as_json:
            bars.show(record)
    return record


class Bars:
    """One progress line per file (by digest): redrawn in place on a terminal, printed
    once, when complete, elsewhere."""

    def __init__(self, out: TextIO, tty: bool) -> None:
        self.out = out
        self.tty = tty
        self.drawn = ""

    def show(self, record: dict[str, Any]) -> None:
        total, done = record.get("total"), record.get("completed")
        status = one_line(str(record.get("status", "")))
        if not isinstance(total, int) or not isinstance(done, int) or total <= 0:
            self.end()
            if status != "success":
                print(status, file=self.out, flush=True)
            return
        digest = str(record.get("digest", ""))
        if digest != self.drawn:
            self.end()
            self.drawn = digest
        text = f"{status} {bar(done, total)} {_mib(done)}/{_mib(total)}"
        if self.tty:
            self.out.write("\r\x1b[K" + text)
            self.out.flush()
        elif done == total:
            print(text, file=self.out, flush=True)

    def end(self) -> None:
        if self.tty and self.drawn:
            self.out.write("\n")
        self.drawn = ""


def bar(done: int, total: int) -> str:
    filled = BAR * done // total
    return f"{100 * done // total:3d}% [{'#' * filled}{' ' * (BAR - filled)}]"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def cmd_rm(client: Client, model: str, as_json: bool) -> int:
    answer = client.delete("/models?model=" + urllib.parse.quote(model, safe="/:"))
    if as_json:
        print(json.dumps(answer))
    else:
        print(f"{model}: removed from the cache")
    return 0
