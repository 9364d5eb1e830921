"""Sizes as people and systemd write them: one spelling, one parser, one MIB."""

from __future__ import annotations

import re
from collections.abc import Callable

MIB = 1024**2
GIB = 1024**3

# systemd's memory sizes (MemoryMax= and friends): bytes with an optional K, M, G, T, P or E
# (powers of 1024), a percentage of physical memory, or "infinity".
SIZE = re.compile(r"(\d+(\.\d+)?[KMGTPE]?|\d+(\.\d+)?%|infinity)")
_UNITS = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5, "E": 1024**6}


def parse_size(text: str | None, ram_total: Callable[[], int]) -> int | None:
    """'512M', '4G', '50%' (of `ram_total()`, asked only then), plain bytes -> bytes;
    None, '' and 'infinity' are no limit (None)."""
    if not text or text.strip().lower() == "infinity":
        return None
    text = text.strip().upper().removesuffix("B")
    if text.endswith("%"):
        return int(ram_total() * float(text[:-1]) / 100)
    if text and text[-1] in _UNITS:
        return int(float(text[:-1]) * _UNITS[text[-1]])
    return int(text)
