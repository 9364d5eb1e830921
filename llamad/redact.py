"""Secrets in presets and args (an hf-token, an API key) never leave llamad.

llamad never lets llama-server download (models come from disk or the cache, and a model
unit on a UNIX socket has no network), so a token is of no use to it; and a model unit's
command line is readable by every local user (/proc/<pid>/cmdline, `systemctl show`). So
secret flags are not passed to llama-server at all (catalog/argv.py `without_secrets`, which
reads an argv by flag arity), and wherever text leaves llamad (the model list, /status,
error bodies, log lines) it is masked here: values after a secret flag, `key = value` lines
of a secret key, and every secret value seen in the catalog (`remember`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MASK = "<redacted>"
# llama-server's flags, and their preset key and environment names, that carry a secret
# (in free text; catalog/argv.py reads them out of an argv).
SECRET_KEYS = frozenset({"hf-token", "hft", "HF_TOKEN", "api-key", "LLAMA_API_KEY"})

_FLAG_TEXT = re.compile(r"(?<![\w-])(--hf-token|-hft|--api-key)(=|\s+)(\S+)")
_KEY_LINE = re.compile(r"(?m)^([ \t]*(?:" + "|".join(map(re.escape, SECRET_KEYS)) +
                       r")[ \t]*=[ \t]*)(\S.*)$")
_known: set[str] = set()


def remember(values: Iterable[str]) -> None:
    """Secret values to mask wherever they turn up (the catalog tells them at each scan)."""
    _known.update(v for v in values if len(v) >= 4)


def text(s: str) -> str:
    s = _FLAG_TEXT.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", s)
    s = _KEY_LINE.sub(lambda m: m.group(1) + MASK, s)
    for value in _known:
        if value in s:
            s = s.replace(value, MASK)
    return s
