"""What llamad leaves out of every start (docs/benchmarks.md, idle RSS and the socket-
activated first answer): lxml, which pystemd's package init imports, and the system's CA
certificates, which aiohttp loads twice when imported; and what it imports is frozen out of
the cycle collector's walks. Each in a fresh interpreter, as llamad starts."""

from __future__ import annotations

import dataclasses
import json
import ssl
import subprocess
import sys
import tracemalloc
from collections.abc import Callable

import rig

from llamad.catalog import gguf_info
from llamad.memory.serverargs import parse_args

PROBE = """
import gc, json, os, sys

def kept_garbage():
    # Bytes of the cycles that are garbage but frozen, so never freed.
    gc.unfreeze()
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.collect()
    return sum(sys.getsizeof(o) for o in gc.garbage)

import llamad.__main__
llamad.__main__.imported("app")  # as `llamad serve` imports it
import aiohttp.connector
print(json.dumps({
    "frozen": gc.get_freeze_count(), "walked": len(gc.get_objects()),
    "lxml": "lxml" in sys.modules,
    "aiohttp_cas": aiohttp.connector._SSL_CONTEXT_VERIFIED.cert_store_stats()["x509_ca"],
    "env": [os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR")],
    "kept_garbage": kept_garbage(),
}))
"""


def probe(env: dict[str, str]) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         env=env, timeout=120, check=True)
    found: dict[str, object] = json.loads(out.stdout.splitlines()[-1])
    return found


def test_a_start_imports_no_lxml_and_loads_no_ca_certificates() -> None:
    found = probe({"PATH": "/usr/bin:/bin", "SSL_CERT_DIR": "/etc/ssl/certs"})
    assert found["lxml"] is False
    # Tens of thousands of objects that live as long as llamad: a full collection that
    # walked them would pause a request for milliseconds.
    assert isinstance(found["frozen"], int) and isinstance(found["walked"], int)
    assert found["frozen"] > 20 * found["walked"], found
    # Not aiohttp's: attrs drops 300 KB of rebuilt classes as it imports.
    assert isinstance(found["kept_garbage"], int) and found["kept_garbage"] < 150_000, found
    assert found["aiohttp_cas"] == 0
    # The environment is as it was: what llamad's own contexts (fleet.py) and llama-server
    # processes see is untouched.
    assert found["env"] == [None, "/etc/ssl/certs"]


def test_peers_over_https_are_still_verified() -> None:
    from llamad.api import fleet
    context = fleet.verified()
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    assert context.cert_store_stats()["x509_ca"] == \
        ssl.create_default_context().cert_store_stats()["x509_ca"]


def bytes_each(make: Callable[[], object], count: int = 1000) -> int:
    tracemalloc.start()
    try:
        made = [make() for _ in range(count)]
        size, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(made) == count
    return size // count


def test_what_llamad_keeps_per_model_stays_small() -> None:
    """The facts kept for every model of the catalog, small enough for 1,000 models in the
    50 MB of idle RSS: an instance dict of 30 or more keys shares none with the others
    (Python 3.11), 1.7 KB a model where GGUFInfo had 30 fields without slots."""
    header = gguf_info.read_header(rig.GEMMA)
    info = bytes_each(lambda: gguf_info.combine([header], None))
    parsed = parse_args(["-c", "8192", "-np", "2"])
    args = bytes_each(lambda: dataclasses.replace(parsed))
    print(f"\nGGUFInfo {info} bytes, ServerArgs {args} bytes each")
    assert info < 600 and args < 600
