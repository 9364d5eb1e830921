"""Secrets in presets and args (an hf-token, an API key) never leave llamad.

llamad never lets llama-server download (models come from disk or the cache, and a model
unit on a UNIX socket has no network), so a token is of no use to it; and a model unit's
command line is readable by every local user (/proc/<pid>/cmdline, `systemctl show`). So
secret flags are not passed to llama-server at all (`without_secrets`), and wherever text
leaves llamad (the model list, /status, error bodies, log lines) it is masked: values after
a secret flag, `key = value` lines of a secret key, and every secret value seen in the
catalog (`remember`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

MASK = "<redacted>"
# llama-server's flags, and their preset key and environment names, that carry a secret.
SECRET_FLAGS = frozenset({"--hf-token", "-hft", "--api-key"})
SECRET_KEYS = frozenset({"hf-token", "hft", "HF_TOKEN", "api-key", "LLAMA_API_KEY"})

_FLAG_TEXT = re.compile(r"(?<![\w-])(--hf-token|-hft|--api-key)(=|\s+)(\S+)")
_KEY_LINE = re.compile(r"(?m)^([ \t]*(?:" + "|".join(map(re.escape, SECRET_KEYS)) +
                       r")[ \t]*=[ \t]*)(\S.*)$")
_known: set[str] = set()


def secret_values(args: Sequence[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a in SECRET_FLAGS]


def without_secrets(args: Sequence[str]) -> tuple[str, ...]:
    """`args` less every secret flag and its value."""
    out: list[str] = []
    skip = False
    for a in args:
        if skip:
            skip = False
        elif a in SECRET_FLAGS:
            skip = True
        else:
            out.append(a)
    return tuple(out)


def remember(values: Iterable[str]) -> None:
    """Secret values to mask wherever they turn up (the catalog tells them at each scan)."""
    _known.update(v for v in values if len(v) >= 4)


def argv(args: Sequence[str]) -> list[str]:
    return [MASK if i and args[i - 1] in SECRET_FLAGS else a for i, a in enumerate(args)]


def text(s: str) -> str:
    s = _FLAG_TEXT.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", s)
    s = _KEY_LINE.sub(lambda m: m.group(1) + MASK, s)
    for value in _known:
        if value in s:
            s = s.replace(value, MASK)
    return s
