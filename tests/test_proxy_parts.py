"""Small pure pieces of the proxy and activation."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llamad.errors import BadRequest
from llamad.http.body import parse_keep_alive
from llamad.supervisor.backend import listen_args, runtime_dir, unix_address
from llamad.supervisor.unitspec import parse_size
from llamad.systemd.activation import bind
from llamad.systemd.exits import describe as describe_exit


def test_keep_alive(subtests: Any) -> None:
    for given, want in [(None, None), (0, 0.0), ("0", 0.0), ("5m", 300.0), ("30s", 30.0),
                        ("1h", 3600.0), (90, 90.0), ("-1", -1.0), (-5, -1.0), ("250ms", 0.25)]:
        with subtests.test(given=given):
            assert parse_keep_alive(given) == want
    for bad in ["soon", "5 minutes", True, "1d"]:
        with subtests.test(bad=bad), pytest.raises(BadRequest):
            parse_keep_alive(bad)


def test_backend_addresses() -> None:
    assert runtime_dir("gemma-a") == "llamad/gemma-a"
    long = runtime_dir("x" * 200)
    assert long.startswith("llamad/") and len(long) == len("llamad/") + 16
    # systemd splits RuntimeDirectory= and BindPaths= at ':' when it reads a unit back.
    assert ":" not in runtime_dir("gemma3:270m") and runtime_dir("gemma3:270m") != long
    addr = unix_address(Path("/run/llamad"), "user-repo:Q4\\x2dK")
    assert len(addr) < 108 and addr.endswith("/llama.sock")
    assert listen_args("unix:/run/llamad/a/llama.sock") == ("--host", "/run/llamad/a/llama.sock")
    assert listen_args("tcp:127.0.0.1:4000") == ("--host", "127.0.0.1", "--port", "4000")


def test_sizes_and_exit_text() -> None:
    assert parse_size("4G") == 4 << 30 and parse_size("512M") == 512 << 20
    assert parse_size(None) is None and parse_size("1000") == 1000
    assert "out of memory" in describe_exit({"Result": "oom-kill"})
    assert "signal 9" in describe_exit({"Result": "signal", "ExecMainCode": 2,
                                        "ExecMainStatus": 9})


def test_bind_rejects_garbage_and_listens() -> None:
    with pytest.raises(ValueError):
        bind("nonsense")
    sock = bind("127.0.0.1:0")
    try:
        assert sock.getsockname()[0] == "127.0.0.1"
    finally:
        sock.close()


def test_systemd_sockets_from_listen_fds() -> None:
    """A child given fd 3 with LISTEN_PID/LISTEN_FDS finds it, as under socket activation."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    code = ("import os, socket; os.environ['LISTEN_PID'] = str(os.getpid()); "
            "from llamad.systemd.activation import systemd_sockets; s = systemd_sockets(); "
            "print(len(s), s[0].getsockname()[1], 'LISTEN_FDS' in os.environ)")
    # close_fds=False: Popen would otherwise close the fd 3 we place in the child.
    out = subprocess.run([sys.executable, "-c", code], close_fds=False,
                         env={**os.environ, "LISTEN_FDS": "1"}, capture_output=True, text=True,
                         preexec_fn=lambda: os.dup2(listener.fileno(), 3), check=True)
    listener.close()
    count, port, leaked = out.stdout.split()
    assert count == "1" and int(port) > 0 and leaked == "False"


def test_hop_by_hop_and_credentials_are_not_forwarded() -> None:
    from llamad.api.forward import _forward_headers
    sent = {"Connection": "keep-alive", "Transfer-Encoding": "chunked", "Host": "x",
            "Authorization": "Bearer k", "Content-Length": "3", "Accept": "text/event-stream",
            "X-Request-Id": "7"}
    assert _forward_headers(sent) == {"Accept": "text/event-stream", "X-Request-Id": "7"}


def test_size_forms() -> None:
    from llamad.memory.gpu import mem_total
    assert parse_size("infinity") is None
    assert parse_size("50%") == mem_total() // 2
