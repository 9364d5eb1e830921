"""llamad: many llama.cpp models behind one OpenAI-compatible port, supervised by systemd."""

import os
import sys

__version__ = "0.1.0"


def _aiohttp_without_system_cas() -> None:
    """Import aiohttp, whose connector builds two TLS client contexts when imported, each
    loading the system's CA certificates: ~2 MB and tens of ms of every start of llamad,
    socket-activated ones included. llamad speaks plain HTTP to its backends, and builds a
    verified context of its own where it may speak TLS (fleet.py: peers given as https://).
    So OpenSSL's default CA paths point at nothing while aiohttp is imported: its default
    contexts hold no CA and verify nothing, and are never used. Where something imported
    aiohttp first (a test), nothing changes."""
    if "aiohttp" in sys.modules:
        return
    saved = {name: os.environ.get(name) for name in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    os.environ.update(SSL_CERT_FILE=os.devnull, SSL_CERT_DIR=os.devnull)
    try:
        import aiohttp.connector  # noqa: F401
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_aiohttp_without_system_cas()
