"""Command line: one subparser per command; errors become one sentence and exit status 1.

To add a command, write add_<name>(subparsers) that sets `func` to a callable taking
the parsed arguments and returning an exit status, and list it in COMMANDS.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

from llamad import __version__, app, cli
from llamad.errors import LlamadError
from llamad.log import die, setup_logging


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, metavar="PATH",
                   help="configuration file (default /etc/llamad/llamad.conf)")


def add_models(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("models", help="list the models llamad would serve")
    _config_arg(p)
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=lambda a: cli.cmd_models(a.config, a.json))


def add_check_config(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("check-config", help="validate the configuration and presets")
    _config_arg(p)
    p.set_defaults(func=lambda a: cli.cmd_check_config(a.config))


def add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the proxy (socket-activated under systemd)")
    _config_arg(p)
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="listen here when systemd passes no socket (default: config's listen)")
    p.set_defaults(func=lambda a: app.run(a.config, a.listen))


def add_ps(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("ps", help="show the running daemon's models as a table")
    _config_arg(p)
    p.add_argument("--url", help="llamad's address (default: from the config's listen)")
    p.set_defaults(func=lambda a: cli.cmd_ps(a.config, a.url))


COMMANDS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    add_models, add_check_config, add_serve, add_ps,
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
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        status: int = args.func(args)
    except LlamadError as e:
        die(e.message)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
