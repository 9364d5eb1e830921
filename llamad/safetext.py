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
