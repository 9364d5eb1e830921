"""The preset file's INI dialect, read as llama.cpp reads it, line by line.

Keys before the first section belong to a section named "default" (`version` is skipped
there as everywhere), a key given twice keeps its last value, a section given twice keeps
its last body. Every key keeps its line number, and a line that cannot be read is an
error of the section it is in, so one bad line spoils one section, not the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from llamad.errors import ConfigError

DEFAULT_SECTION = "default"  # llama.cpp's name for keys before the first section

_HEADER = re.compile(r"[ \t]*\[[ \t]*([^\]]*?)[ \t]*\][ \t]*([;#].*)?")
_KV = re.compile(r"[ \t]*([A-Za-z_][A-Za-z0-9_.-]*)[ \t]*=[ \t]*([^;#\r\n]*?)[ \t]*([;#].*)?")
_BLANK = re.compile(r"[ \t]*([;#].*)?")
_TAG = re.compile(r"[-.]([A-Z0-9_]+)$", re.IGNORECASE)
# llama.cpp's grammar ends a line at \r\n, \n or \r only; str.splitlines also ends one at
# U+2028, \x0c and others, which would make the rest of a value a key of its own.
_EOL = re.compile(r"\r\n|\n|\r")


@dataclass
class RawSection:
    """One section as written: (key, value, line) in file order, its text, its errors."""

    name: str
    line: int = 0  # of its [header]; 0 for keys before any section
    items: list[tuple[str, str, int]] = field(default_factory=list)
    text: str = ""
    errors: list[ConfigError] = field(default_factory=list)


def canonical_name(section: str) -> str:
    """`user/repo:q4_k_m` -> `user/repo:Q4_K_M`, as the router spells cache models."""
    head, colon, tag = section.rpartition(":")
    if not colon or section == "*":
        return section
    m = _TAG.search(tag)
    return head + ":" + (m.group(1) if m else tag).upper()


def section_name(written: str) -> str:
    """A [section]'s model name. The router spells a cache model's tag in capitals
    (`user/repo:q4_k_m` is `user/repo:Q4_K_M`); only names of that shape are respelled,
    since an Ollama model's (`gemma3:270m`, `hf.co/user/repo:q4_k_m`) or a file's keep
    their case, and a section must match them as written."""
    head = written.rpartition(":")[0]
    return canonical_name(written) if head.count("/") == 1 else written


def parse_ini(text: str, where: str) -> list[RawSection]:
    """The file's sections in file order; llama.cpp's INI dialect. Never raises: a line
    that cannot be read is recorded in its section's errors."""
    out: dict[str, RawSection] = {}
    current = RawSection(DEFAULT_SECTION)
    for n, line in enumerate(_EOL.split(text.removesuffix("\n").removesuffix("\r")), 1):
        if m := _HEADER.fullmatch(line):
            name = section_name(m.group(1))
            out.pop(name, None)  # a section given again starts afresh, and goes last
            current = out[name] = RawSection(name, n, text=line + "\n")
            continue
        if current.name not in out and not _BLANK.fullmatch(line):
            out[current.name] = current
        if m := _KV.fullmatch(line):
            current.items[:] = [i for i in current.items if i[0] != m.group(1)]
            current.items.append((m.group(1), m.group(2), n))
        elif not _BLANK.fullmatch(line):
            current.errors.append(ConfigError(
                f"{where}:{n} [{current.name}]: cannot parse {line.strip()!r}; "
                "expected [section], key = value or a comment."))
        current.text += line + "\n"
    return [s for s in out.values() if s.name != DEFAULT_SECTION or s.errors
            or any(k != "version" for k, _, _ in s.items)]
