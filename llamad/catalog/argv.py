"""Reading a llama-server argv option by option, by each flag's arity (llama_flags).

A value is never mistaken for a flag (`-a -c` is alias "-c", not a context size). As in
llama.cpp, `--a_b` is `--a-b` and there is no `--flag=value`. Every reader of a model's
argv (memory estimates, fitting, the listing) asks here rather than scanning tokens. Pure.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from llamad.catalog.llama_flags import FLAGS

ARITY = {"value": 1, "two": 2}


@dataclass(frozen=True)
class Option:
    flag: str  # the canonical spelling (llama.cpp's last one), e.g. --ctx-size for -c
    values: tuple[str, ...]  # () for switches
    negated: bool = False  # a --no-... spelling


@functools.cache
def _table() -> dict[str, tuple[str, int, bool]]:
    """Each spelling -> (canonical spelling, number of values, negated)."""
    out: dict[str, tuple[str, int, bool]] = {}
    for names, neg, kind, _env in FLAGS:
        for spellings, negated in ((names, False), (neg, True)):
            for s in spellings:
                # A later entry wins, as in presets.py (`--rpc` is listed twice).
                out[s] = (names[-1], ARITY.get(kind, 0), negated)
    return out


def canonical(spelling: str) -> str:
    """`-c` -> `--ctx-size`; an unknown spelling stays as it is."""
    return _table().get(spelling, (spelling, 0, False))[0]


def walk(argv: Sequence[str]) -> Iterator[Option]:
    """The options of an argv in order; tokens that are no known flag are skipped."""
    table = _table()
    i = 0
    while i < len(argv):
        token = argv[i]
        found = table.get(token.replace("_", "-") if token.startswith("--") else token)
        if found is None:
            i += 1
            continue
        name, arity, negated = found
        yield Option(name, tuple(argv[i + 1:i + 1 + arity]), negated)
        i += 1 + arity


def last(argv: Sequence[str], flag: str) -> str | None:
    """The value of the last `flag` (any spelling) in argv; None if absent."""
    want = canonical(flag)
    found = None
    for option in walk(argv):
        if option.flag == want:
            found = option.values[0] if option.values else ""
    return found


def given(argv: Sequence[str], *flags: str) -> bool:
    """Whether any of these flags (any spelling) is in argv."""
    want = {canonical(f) for f in flags}
    return any(option.flag in want for option in walk(argv))
