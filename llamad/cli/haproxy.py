"""HAProxy in front of several llamad hosts: the configuration `llamad haproxy-config`
prints from a list of hosts (docs/scaling.md explains it,
tests/integration/test_haproxy_fleet.py runs it).

Each model lives on one host: requests are hashed on the model they name (the JSON body's
"model", else `?model=`, the path of /v1/models/ID and /logs/stream/ID, or a stream's
CONVERSATION::MODEL) with consistent hashing (a host that leaves or joins moves only its
own share of the models), or pinned to a host with `--place MODEL=HOST:PORT` (ignored
while that host is down). Every host's /health is checked each second; two failures take
it out (llamad answers 503 there while draining, see fleet.py), two successes bring it
back. A request that cannot reach its host, or gets no answer at all, is sent to the next
host.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from llamad import __version__
from llamad.errors import ConfigError

_HOST = re.compile(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*):(\d{1,5})")
# What a model name may hold to be written into an ACL unquoted; llamad's own names
# (catalog.py) fit, an alias with spaces or quotes cannot be placed. Not a leading '-':
# HAProxy would read it as one of the match's flags (-i, -f, -m ...).
_MODEL = re.compile(r"[A-Za-z0-9._:/@+][A-Za-z0-9._:/@+-]*")
# HAProxy reads the request body up to its buffer size to find "model". A request whose
# "model" lies beyond it is balanced round-robin: a cold load on another host, not an error.
BUFSIZE = 262144
CHECK_EVERY = "1s"
_UNSET = "if !{ var(txn.model) -m found }"
# Requests that name their model elsewhere than in a JSON body go to that model's host
# too: round-robin, GET /props?model=M (which llama.cpp's web UI asks when M is picked)
# loaded M on a second host, and a stream was resumed where it never ran. Decoded, as the
# body's name is: "org%2Fm" and "org/m" are one model, hashed alike.
_ELSEWHERE = (
    "    # GET /props?model=, /slots?model=, /metrics?model=, /lora-adapters?model=",
    f"    http-request set-var(txn.model) url_param(model),url_dec {_UNSET}",
    "    # GET /v1/models/ID, DELETE /v1/models/ID, GET /logs/stream/ID",
    *(f"    http-request set-var(txn.model) path,regsub(^{p},),url_dec {_UNSET} "
      f"{{ path_beg {p} }}" for p in ("/v1/models/", "/logs/stream/")),
    "    # A stream resumed, stopped or looked up: CONVERSATION::MODEL (llama.cpp's web UI;",
    "    # a lookup of several models' conversations goes to the first one's host)",
    "    http-request set-var(txn.model) url_param(conv_id),url_dec,regsub(^.*::,) "
    f"{_UNSET} {{ url_param(conv_id),url_dec -m sub :: }}",
    "    http-request set-var(txn.model) req.body,json_query('$.conversation_ids[0]'),"
    f"regsub(^.*::,) {_UNSET} {{ req.body,json_query('$.conversation_ids[0]') -m sub :: }}",
)


def host(text: str) -> str:
    """'HOST:PORT' checked, as HAProxy takes it; anything else raises one sentence. One
    spelling per host (names and hex digits in lower case, the port without leading
    zeros), so that the same host given twice is seen to be."""
    m = _HOST.fullmatch(text.strip())
    if m is None or not 0 < int(m.group(2)) < 65536:
        raise ConfigError(f"{text!r} is not a llamad host; give HOST:PORT such as "
                          "10.0.0.2:8080 or [fd00::2]:8080")
    return f"{m.group(1).lower()}:{int(m.group(2))}"


def _name(address: str) -> str:
    """The server's name: its address, which X-Llamad-Host then shows ([] not allowed)."""
    return address.replace("[", "").replace("]", "")


def placements(pairs: Sequence[str], hosts: Sequence[str]) -> dict[str, str]:
    """`MODEL=HOST:PORT` pairs as {model: host}; the host must be one of `hosts`."""
    out: dict[str, str] = {}
    for pair in pairs:
        model, sep, where = pair.partition("=")
        if not sep or not _MODEL.fullmatch(model):
            raise ConfigError(f"--place {pair!r} is not MODEL=HOST:PORT with a model name "
                              "of letters, digits and ._:/@+- that does not start with -")
        if host(where) not in hosts:
            raise ConfigError(f"--place {pair!r} names {where}, which is not among the "
                              f"hosts given ({', '.join(hosts)})")
        out[model] = host(where)
    return out


def config(hosts: Sequence[str], listen: str, place: Mapping[str, str] | None = None) -> str:
    """A complete haproxy.cfg for HAProxy 2.6 (Debian 12)."""
    hosts = [host(h) for h in hosts]
    if not hosts:
        raise ConfigError("give at least one llamad host as HOST:PORT")
    if len(set(hosts)) != len(hosts):
        raise ConfigError("a llamad host is given twice")
    listen = host(listen)
    rules = [f"    use-server {_name(where)} if {{ var(txn.model) -m str {model} }}"
             for model, where in (place or {}).items()]
    servers = [f"    server {_name(h)} {h}" for h in hosts]
    return "\n".join([
        f"# HAProxy in front of {len(hosts)} llamad hosts, from `llamad haproxy-config` "
        f"(llamad {__version__}).",
        "# Every host should have every model (a model hashed to a host that lacks it is 404).",
        "global",
        "    maxconn 4096",
        f"    tune.bufsize {BUFSIZE}  # the part of a body searched for \"model\"",
        "",
        "defaults",
        "    mode http",
        "    timeout connect 2s",
        "    timeout http-request 30s",
        "    timeout queue 60s",
        "    # A model may take minutes to load and generate before its first byte.",
        "    timeout client 10m",
        "    timeout server 10m",
        "    timeout check 2s",
        "",
        "frontend llamad",
        f"    bind {listen}",
        "    option http-buffer-request",
        "    http-request set-var(txn.model) req.body,json_query('$.model')",
        *_ELSEWHERE,
        "    default_backend llamad_hosts",
        "",
        "backend llamad_hosts",
        "    # Requests without a model (GET /v1/models, /health) go round-robin.",
        "    balance hash var(txn.model)",
        "    hash-type consistent",
        "    option httpchk",
        "    # localhost: llamad accepts a loopback Host without allowed-hosts.",
        "    http-check send meth GET uri /health ver HTTP/1.1 hdr Host localhost",
        "    http-check expect status 200",
        "    # A host name that does not resolve at start leaves that host out, not HAProxy.",
        f"    default-server check inter {CHECK_EVERY} fall 2 rise 2 init-addr libc,none",
        "    # A host that refuses the connection or closes it unanswered: the next one.",
        "    retries 2",
        "    option redispatch 1",
        "    retry-on conn-failure empty-response",
        "    # Which host answered (their addresses, to clients: drop this line to hide them).",
        "    http-response set-header X-Llamad-Host %s",
        *rules,
        *servers,
        "",
    ])


def cmd_haproxy_config(hosts: Sequence[str], listen: str, place: Sequence[str]) -> int:
    """`llamad haproxy-config`: print the configuration."""
    checked = [host(h) for h in hosts]
    print(config(checked, listen, placements(place, checked)), end="")
    return 0
