"""Command line: one subparser per command; errors become one sentence and exit status 1.

To add a command, write add_<name>(subparsers) that sets `func` to a callable taking
the parsed arguments and returning an exit status, and list it in COMMANDS.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import io
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from llamad import __version__
from llamad.cli import ENV_KEY, ENV_URL, LOG_LINES_MAX
from llamad.errors import LlamadError
from llamad.log import die, setup_logging


def imported(name: str) -> Any:
    """llamad.<name>, imported when its command runs: `llamad serve`, whose start a
    socket-activated client waits for, loads no client code, and a client command no server
    code. Everything a command imports stays for the life of the process."""
    # aiohttp comes first, with the collector on: attrs rebuilds its classes as it imports
    # and drops the old ones, 300 KB of cycles that a freeze would keep for good.
    _aiohttp_without_system_cas()
    with lifelong_imports():
        return importlib.import_module(f"llamad.{name}")


@contextlib.contextmanager
def lifelong_imports() -> Iterator[None]:
    """Importing llamad's modules makes tens of thousands of objects that never become
    garbage (50 KB of the cycles they leave are): the cycle collector walked them about a
    hundred times while they loaded (10 ms of each start here, socket-activated ones
    included) and would again in every full collection afterwards (5-7 ms, paid by
    whichever request is in flight). Frozen (gc.freeze), the collector leaves them alone."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


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


def _seconds(least: float, inclusive: bool) -> Callable[[str], float]:
    """An argparse type: a finite number of seconds from `least` (NaN would make --wait
    wait for ever, a negative --watch a traceback from time.sleep)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value >= least if inclusive else value > least)):
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a number of seconds {'>=' if inclusive else '>'} {least:g}")
        return value
    parse.__name__ = "seconds"
    return parse


def _count(most: int) -> Callable[[str], int]:
    """An argparse type: a whole number from 0 to `most` (what llamad's API takes)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = -1
        if not 0 <= value <= most:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 0 to {most}")
        return value
    parse.__name__ = "count"
    return parse


def _listen(text: str) -> str:
    """An argparse type: HOST:PORT as llamad.conf's listen takes it (an empty HOST is
    loopback), checked before anything binds, where it was a traceback."""
    config = importlib.import_module("llamad.config")
    if not config.valid_listen("127.0.0.1" + text if text.startswith(":") else text, 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT, PORT from 0 (any "
                                         "free one) to 65535, such as 127.0.0.1:8080")
    return text


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, metavar="PATH",
                   help="configuration file (default /etc/llamad/llamad.conf)")


def add_models(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("models", aliases=["list", "ls"],  # Ollama's words for it
                       help="list the models llamad would serve")
    _config_arg(p)
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=lambda a: imported("cli.models").cmd_models(a.config, a.json))


def add_check_config(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("check-config", help="validate the configuration and presets")
    _config_arg(p)
    p.set_defaults(func=lambda a: imported("cli.models").cmd_check_config(a.config))


def add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the proxy (socket-activated under systemd)")
    _config_arg(p)
    p.add_argument("--listen", metavar="HOST:PORT", type=_listen,
                   help="listen here when systemd passes no socket (default: config's listen)")
    p.set_defaults(func=lambda a: imported("app").run(a.config, a.listen))


def _client_args(p: argparse.ArgumentParser, json_help: str = "print JSON") -> None:
    _config_arg(p)
    p.add_argument("--url", help=f"llamad's address (default: ${ENV_URL}, else where "
                   "llamad.socket listens, else the config's listen); the API key comes "
                   "from $" + ENV_KEY)
    p.add_argument("--json", action="store_true", help=json_help)


def _client(a: argparse.Namespace) -> Any:
    return imported("cli.ctl").Client.make(a.config, a.url)


def add_load(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("load", help="load a model in the running daemon")
    p.add_argument("model")
    _client_args(p)
    p.add_argument("--wait", action="store_true", help="return once the model is ready")
    p.add_argument("--timeout", type=_seconds(0, True), default=300, metavar="SECONDS",
                   help="how long --wait waits (default 300)")
    p.set_defaults(func=lambda a: imported("cli.ctl").cmd_load(_client(a), a.model, a.wait,
                                                              a.timeout, a.json))


def add_unload(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("unload", aliases=["stop"],  # `ollama stop MODEL`
                       help="unload a model once its requests have finished")
    p.add_argument("model")
    _client_args(p)
    p.set_defaults(func=lambda a: imported("cli.ctl").cmd_unload(_client(a), a.model, a.json))


def add_pull(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("pull", help="download a model from the Hugging Face hub into "
                       "llama.cpp's cache, through the running daemon")
    p.add_argument("model", metavar="user/repo[:QUANT]")
    _client_args(p, "print each progress line as JSON")
    p.set_defaults(func=lambda a: imported("cli.pull").cmd_pull(_client(a), a.model, a.json))


def add_rm(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("rm", help="remove a downloaded model from llama.cpp's cache")
    p.add_argument("model", metavar="user/repo:QUANT")
    _client_args(p)
    p.set_defaults(func=lambda a: imported("cli.pull").cmd_rm(_client(a), a.model, a.json))


def add_logs(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("logs", help="llamad's journal lines, or a model's")
    p.add_argument("model", nargs="?", help="a model's unit instead of llamad's")
    _client_args(p, "print each entry as a JSON line")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument("-n", "--lines", type=_count(LOG_LINES_MAX), default=20, metavar="N",
                   help=f"how many earlier lines to print first (default 20, at most "
                   f"{LOG_LINES_MAX})")
    p.set_defaults(func=lambda a: imported("cli.ctl").cmd_logs(_client(a), a.model, a.follow,
                                                              a.lines, a.json))


def add_ps(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("ps", help="show the running daemon's models as a table")
    _client_args(p, "print the daemon's /status as JSON")
    p.add_argument("--watch", type=_seconds(0, False), nargs="?", const=2.0,
                   metavar="SECONDS",
                   help="redraw every SECONDS (default 2) until interrupted")
    p.set_defaults(func=lambda a: imported("cli.ctl").cmd_ps(_client(a), a.json, a.watch))


def add_top(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("top", help="a live table of the daemon's models (ps --watch)")
    _client_args(p, "print the daemon's /status as one JSON line each time")
    p.add_argument("--interval", type=_seconds(0, False), default=2.0, metavar="SECONDS",
                   help="seconds between redraws (default 2)")
    p.set_defaults(func=lambda a: imported("cli.ctl").cmd_ps(_client(a), a.json, a.interval))


def add_haproxy_config(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("haproxy-config", help="print an HAProxy configuration that routes "
                       "each model to one of these llamad hosts (docs/scaling.md)")
    p.add_argument("hosts", nargs="+", metavar="HOST:PORT", help="the llamad hosts")
    p.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT",
                   help="where HAProxy listens (default 127.0.0.1:8080)")
    p.add_argument("--place", action="append", default=[], metavar="MODEL=HOST:PORT",
                   help="serve MODEL on this host while it is up (repeatable); other "
                   "models are placed by hashing their name")
    p.set_defaults(func=lambda a: imported("cli.haproxy").cmd_haproxy_config(a.hosts, a.listen,
                                                                            a.place))


def add_completion(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("completion", help="print bash completion: source <(llamad completion)")
    p.set_defaults(func=_print_completion)


def _print_completion(args: argparse.Namespace) -> int:
    print(imported("cli.completion").bash(parser()), end="")
    return 0


COMMANDS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    add_models, add_check_config, add_serve, add_ps, add_load, add_unload, add_pull, add_rm,
    add_logs, add_top,
    add_completion, add_haproxy_config,
]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llamad", description="llama.cpp models behind one "
                                "OpenAI-compatible port, supervised by systemd.")
    p.add_argument("--version", action="version", version=f"llamad {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    _forgiving_streams()
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        status: int = args.func(args)
    except LlamadError as e:
        die(e.message)
    except KeyboardInterrupt:  # the way out of logs -f and top
        return 130
    except BrokenPipeError:  # `llamad logs | head -1`: the reader left; nothing to say
        # Python flushes stdout once more at exit: into /dev/null, not the broken pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # as if SIGPIPE had ended it, which the shell reports so
    return status


def _forgiving_streams() -> None:
    """A terminal whose locale is not UTF-8 gets \\uXXXX for what it cannot show (a model's
    name) rather than a UnicodeEncodeError; a closed stdout (`llamad models >&-`) is
    /dev/null rather than None."""
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- for the life of the process
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")


if __name__ == "__main__":
    raise SystemExit(main())
