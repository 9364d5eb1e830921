"""Strings that may reach systemd and the journal: no control characters, valid UTF-8.

systemd 252 writes a transient unit's Description= raw into its unit file, so a newline
there becomes new directives after a daemon-reload; a newline in a log line forges a
second journal entry. File names are the usual way such strings arrive.
"""

from __future__ import annotations

import re

# C0, DEL and C1 (U+0080-U+009F: U+009B is CSI to terminals that take 8-bit controls).
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def unsafe(text: str) -> str | None:
    """Why `text` may not reach systemd, or None when it may."""
    if CONTROL.search(text):
        return "holds control characters"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes of a file name (surrogate escapes)
        return "is not valid UTF-8"
    return None


def one_line(text: str) -> str:
    """`text` with control characters and undecodable bytes escaped, for one log line."""
    text = CONTROL.sub(lambda m: "\\" + {"\n": "n", "\r": "r", "\t": "t"}.get(
        m.group(), f"x{ord(m.group()):02x}"), text)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# Printable to the journal, yet a terminal reorders the rest of the line after a bidi
# override or isolate (Trojan Source), and Unicode-aware readers break lines at U+2028/9.
# The catalog takes model names holding them: they have no control character.
INVISIBLE = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]")


def readable(text: str) -> str:
    """`text` as one log line that shows what it holds: control characters, bidi
    formatting and line separators escaped."""
    text = one_line(text) if CONTROL.search(text) else text
    return INVISIBLE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
