"""README.md's quick start as the tests run it: every command in it is run by a test.

The section's first fenced `sh` block is `make demo` (tests/integration/test_demo.py); the
second is the install by hand, which tests/integration/test_package.py runs to install the
.deb it tests (its first command, `make deb`, on the host; the others in the box).
"""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Quick start"


def quick_start() -> list[list[str]]:
    """The commands of each `sh` block in the README's quick start, comments kept."""
    text = README.read_text()
    section = text[text.index(SECTION):]
    section = section[:section.find("\n## ", len(SECTION))]
    blocks = re.findall(r"^```sh\n(.*?)^```$", section, re.M | re.S)
    # A line ending in a backslash goes on on the next one, as in the shell.
    return [[line for line in re.sub(r"\\\n\s*", "", block).splitlines() if line.strip()]
            for block in blocks]


def command(line: str) -> str:
    """The command without its trailing comment (two spaces, then #)."""
    return re.split(r"\s{2,}# ", line, maxsplit=1)[0].strip()
