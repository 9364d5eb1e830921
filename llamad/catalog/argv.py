"""llama-server's command line read as llama-server reads it: each flag takes exactly as many
values as it has (llama_flags.py), so a value is never mistaken for a flag.

A model's argv holds values llamad did not choose: file paths and the model's id after
`--alias`. A file named `--rpc=10.0.0.7:80.gguf` once made every token scanner in llamad
take its own name for an `--rpc` flag (docs/security.md, "Names are never flags"). So
every reader of an argv in llamad (RPC workers, the memory estimate, secrets, fitting,
KV-cache settings) goes through `walk`, and a token in a value's place is only ever a value.
Pure.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from llamad.catalog.llama_flags import FLAGS


@dataclass(frozen=True)
class Flag:
    """One llama-server option as its --help lists it: spellings, negations, what follows it."""

    names: tuple[str, ...]
    neg: tuple[str, ...]
    kind: str  # value | bool | flag | two
    env: str | None

    @property
    def canonical(self) -> str:
        return self.names[-1]  # llama.cpp renders the last (long) spelling too

    @property
    def arity(self) -> int:
        """How many values follow the flag."""
        return ARITY.get(self.kind, 0)


ARITY = {"value": 1, "two": 2}


Entry = tuple[tuple[str, ...], tuple[str, ...], str, str | None]  # as llama_flags.FLAGS
Spellings = Mapping[str, tuple[Flag, bool]]


def keys(entries: Iterable[Entry] = FLAGS
         ) -> tuple[dict[str, tuple[Flag, bool]], dict[str, tuple[Flag, bool]]]:
    """(preset key -> (flag, negated)), (command-line spelling -> (flag, negated)), of the
    built-in flags or of another binary's (catalog/flagtable.py)."""
    by_key: dict[str, tuple[Flag, bool]] = {}
    by_arg: dict[str, tuple[Flag, bool]] = {}
    for names, neg, kind, env in entries:
        flag = Flag(names, neg, kind, env)
        for spellings, negated in ((names, False), (neg, True)):
            for s in spellings:
                by_key[s.lstrip("-")] = by_arg[s] = (flag, negated)
        if env:
            by_key[env] = (flag, False)
            if neg:
                by_key[env.replace("LLAMA_ARG_", "LLAMA_ARG_NO_")] = (flag, True)
    return by_key, by_arg


BY_KEY, BY_ARG = keys()


class Option(NamedTuple):
    """One flag of an argv and its values; `flag` is None for a token that is no
    llama-server flag (llamad renders none, so readers pass over it)."""

    at: int  # index of the flag's token in the argv
    given: str  # the token as written
    flag: Flag | None
    negated: bool
    values: tuple[str, ...]  # fewer than flag.arity only where the argv ends early

    @property
    def name(self) -> str:
        """The canonical spelling (`-c` -> `--ctx-size`); the token itself if unknown."""
        return self.flag.canonical if self.flag is not None else self.given

    @property
    def value(self) -> str:
        return self.values[0] if self.values else ""


def lookup(token: str, by_arg: Spellings | None = None) -> tuple[Flag, bool] | None:
    """The flag a token spells, as llama-server takes it (`--ctx_size` is `--ctx-size`);
    `by_arg`: another binary's spellings (a preset's llama-server)."""
    if token.startswith("--"):
        token = token.replace("_", "-")
    return (BY_ARG if by_arg is None else by_arg).get(token)


def walk(args: Sequence[str], by_arg: Spellings | None = None) -> Iterator[Option]:
    """Each option of a llama-server argv, in order, values taken by the flag's arity."""
    i = 0
    while i < len(args):
        found = lookup(args[i], by_arg)
        if found is None:
            yield Option(i, args[i], None, False, ())
            i += 1
            continue
        flag, negated = found
        yield Option(i, args[i], flag, negated, tuple(args[i + 1:i + 1 + flag.arity]))
        i += 1 + flag.arity


def canonical(spelling: str) -> str:
    """`-c` -> `--ctx-size`: the name `Option.name` gives for a flag spelled so."""
    found = lookup(spelling)
    if found is None:
        raise KeyError(f"{spelling} is not a llama-server flag")
    return found[0].canonical


def last(args: Sequence[str], name: str) -> Option | None:
    """The last option of that canonical name (llama-server keeps the last one given)."""
    found = None
    for option in walk(args):
        if option.name == name:
            found = option
    return found


def has(args: Sequence[str], name: str) -> bool:
    """Whether the argv gives the flag of that canonical name, in any spelling."""
    return any(option.name == name for option in walk(args))


# -- secrets ---------------------------------------------------------------------------------

# llama-server's flags that carry a secret (their spellings and preset keys: redact.py).
SECRETS = frozenset(canonical(s) for s in ("--hf-token", "--api-key"))


def secret_values(args: Sequence[str]) -> list[str]:
    """The values of every secret flag."""
    return [o.value for o in walk(args) if o.name in SECRETS and o.values]


def without_secrets(args: Sequence[str]) -> tuple[str, ...]:
    """`args` less every secret flag and its value."""
    out: list[str] = []
    for o in walk(args):
        if o.name not in SECRETS:
            out += [o.given, *o.values]
    return tuple(out)


def masked(args: Sequence[str], mask: str) -> list[str]:
    """`args` with each secret flag's value replaced by `mask`, for showing."""
    out: list[str] = []
    for o in walk(args):
        out += [o.given, *([mask] * len(o.values) if o.name in SECRETS else o.values)]
    return out


# -- the unit file -----------------------------------------------------------------------------

# systemd 252 (Debian 12) writes '$' and ';' of a transient unit's ExecStart= into its unit
# file as `\$` and `\;`, and reads them back, at every daemon-reload, with the backslash
# kept: a model whose path or name holds one would come back from its next crash loading a
# file that is not there. Its Environment= is kept as it is.
UNIT_FILE_UNSAFE = frozenset("$;")


def for_unit_file(args: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(argv, environment) that run as `args` do: each option given once whose value holds
    such a character goes in llama-server's environment variable for it instead (an
    argument would win over it; given twice, it stays, as a repeated flag may add up)."""
    options = list(walk(args))
    seen = Counter(o.name for o in options)
    out: list[str] = []
    env: list[str] = []
    for o in options:
        if o.flag is not None and o.flag.env and o.flag.arity == 1 and not o.negated \
                and seen[o.name] == 1 and UNIT_FILE_UNSAFE & set(o.value):
            env.append(f"{o.flag.env}={o.value}")
        else:
            out += [o.given, *o.values]
    return tuple(out), tuple(env)
