"""The daemon client's parts that need no daemon: completion, the ps table, the sentence
when llamad is not there. tests/integration/test_cli_daemon.py runs it against llamad."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
from typing import Any

from llamad.__main__ import parser
from llamad.cli import completion, ctl


def complete(*words: str) -> list[str]:
    """What bash offers after `words` (the last one being completed)."""
    script = completion.bash(parser())
    line = " ".join(f"'{w}'" for w in words)
    out = subprocess.run(["bash", "-c", f'{script}\nCOMP_WORDS=({line}); '
                          f'COMP_CWORD={len(words) - 1}; _llamad; echo "${{COMPREPLY[@]}}"'],
                         capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_bash_completion_from_the_parser() -> None:
    assert complete("llamad", "lo") == ["load", "logs"]
    assert complete("llamad", "logs", "--f") == ["--follow"]
    assert "--watch" in complete("llamad", "ps", "--")
    assert complete("llamad", "completion", "--x") == []


def test_ps_table() -> None:
    status: dict[str, Any] = {
        "status": "2 models, 1 loaded: a", "gpus": [
            {"index": 0, "name": "H100", "used": 2 << 30, "total": 80 << 30}],
        "models": {"a": {"state": "ready", "main_pid": 42, "ram": 400 << 20, "vram": None,
                         "estimate": {"ram": 300 << 20, "vram": 100 << 20},
                         "load_seconds": 2.71, "in_flight": 1, "queued": 0, "served": 9,
                         "ttl_left": 299.6},
                   "b": {"state": "loading", "main_pid": 43, "ram": None, "vram": None,
                         "estimate": {"ram": 300 << 20, "vram": 0}, "in_flight": 0,
                         "served": 0, "ttl_left": None,
                         "fit": {"args": ["--ctx-size", "12288"], "ctx": 12288,
                                 "reason": "context 12288 of 131072: 9.1 GiB free on GPU 0 "
                                           "after evicting nothing"}}}}
    lines = ctl.ps_table(status)
    assert lines[0].split() == ["MODEL", "STATE", "PID", "RAM", "VRAM", "ESTIMATE", "LOAD",
                                "IN", "FLIGHT", "QUEUED", "SERVED", "TTL", "LEFT", "CONTEXT"]
    assert lines[1].split() == ["a", "ready", "42", "400", "MiB", "-", "400", "MiB", "2.7s",
                                "1", "0", "9", "300s", "-"]
    assert lines[2].split()[:2] == ["b", "loading"] and lines[2].split()[-1] == "12288"
    assert lines[3:] == ["b: context 12288 of 131072: 9.1 GiB free on GPU 0 after evicting "
                         "nothing", "GPU 0 H100: 2048 MiB used of 81920 MiB",
                         "2 models, 1 loaded: a"]


def test_log_events_and_lines() -> None:
    stream = io.BytesIO(b'id: c1\ndata: {"time": 0, "unit": "u", "priority": 6, '
                        b'"message": "hello\\u001b[31m"}\n\n: a comment\n\n')
    entries = list(ctl._events(stream))  # type: ignore[arg-type]
    assert entries == [{"id": "c1", "time": 0, "unit": "u", "priority": 6,
                        "message": "hello\x1b[31m"}]
    assert ctl._log_line(entries[0]).endswith(" u: hello\\x1b[31m")  # no escape to the tty


def test_not_running_is_one_sentence() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: refused
        out = subprocess.run([sys.executable, "-m", "llamad", "unload", "x", "--url", url],
                             capture_output=True, text=True)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith(f"llamad: llamad is not running at {url} (connection "
                                 "refused)") and out.stderr.count("\n") == 1
