"""Which paths a model unit can see and read, as one sentence per problem.

Model units run sandboxed (units.transient_properties): PrivateTmp= gives them an empty
/tmp and /var/tmp of their own, PrivateDevices= an empty /dev/shm, ProtectHome=yes or
tmpfs hides /home, /root and /run/user, and DynamicUser= runs them as a user that owns no
file, so only what every user may read is theirs. A llama-server or model file the admin
can use may therefore be out of the unit's reach; this module says so, for
`llamad check-config` and for failure reasons.
llamad.service has the same PrivateTmp= and ProtectHome= (tests/test_unitpaths.py checks).
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamad.config import Config, cache_dir
from llamad.systemd.unitname import unit_name
from llamad.systemd.units import UnitSpec, transient_properties

# What each sandbox setting hides, and how a unit sees the place instead.
_PRIVATE_TMP = (("/tmp", "/var/tmp"), "an empty private directory (PrivateTmp=yes)")
_PROTECT_HOME = (("/home", "/root", "/run/user"), "an empty directory (ProtectHome={})")
_PRIVATE_DEVICES = (("/dev/shm",), "an empty private directory (PrivateDevices=yes)")
_TMPFS = "an empty directory (TemporaryFileSystem=)"


@dataclass(frozen=True)
class Sandbox:
    """What a model unit can see: hidden prefixes (with why) and the user it runs as."""

    hidden: tuple[tuple[str, str], ...]  # (prefix, how the unit sees it)
    user: str | None  # None: DynamicUser=yes
    units: str = "model units"  # whose sandbox, for sentences

    @property
    def who(self) -> str:
        return "the model units' dynamic user" if self.user is None else f"user {self.user!r}"


def sandbox(spec: UnitSpec) -> Sandbox:
    """The sandbox the unit described by `spec` gets, read from its transient properties."""
    return Sandbox(hidden_places(transient_properties(spec)), spec.user)


def hidden_places(properties: Sequence[tuple[str, bytes, Any]]) -> tuple[tuple[str, str], ...]:
    """The places a unit with these transient properties does not see, each with how it
    sees the place instead."""
    props: dict[str, Any] = {name: value for name, _sig, value in properties}
    hidden: list[tuple[str, str]] = []
    if props.get("PrivateTmp"):
        hidden += [(p, _PRIVATE_TMP[1]) for p in _PRIVATE_TMP[0]]
    home = props.get("ProtectHome")
    if home in ("yes", "tmpfs"):
        hidden += [(p, _PROTECT_HOME[1].format(home)) for p in _PROTECT_HOME[0]]
    if props.get("PrivateDevices"):
        hidden += [(p, _PRIVATE_DEVICES[1]) for p in _PRIVATE_DEVICES[0]]
    # Only the last of a repeated property counts here, as in the dict above: model units
    # set TemporaryFileSystem= once (/run, with their socket directory bound back in).
    for path, _options in props.get("TemporaryFileSystem", ()):
        hidden.append((path, _TMPFS))
    for path in props.get("InaccessiblePaths", ()):
        hidden.append((path, "inaccessible (InaccessiblePaths=)"))
    return tuple(hidden)


def for_units(llama_server: Path, user: str | None) -> Sandbox:
    """The sandbox of any model unit llamad starts with this configuration."""
    return sandbox(UnitSpec(name=unit_name("check"), description="check",
                            argv=(str(llama_server),), user=user))


def problem(path: Path, box: Sandbox, need: str) -> str | None:
    """Why a unit in `box` cannot use `path`, as a sentence without a full stop; else None.

    `need` is "x" (execute a file), "r" (read a file) or "d" (open files in a directory,
    as llama-server does with a model's: it needs no listing, only passage).
    The path is checked as written and, where links lead elsewhere, as resolved.
    """
    why = hidden(path, box)
    if why:
        return f"{path} is under {why}"
    real = Path(os.path.realpath(path))
    if not real.exists():
        return f"{path} does not exist"
    for candidate in dict.fromkeys((Path(os.path.abspath(path)), real)):
        why = _unreadable(candidate, box, need)
        if why:
            return f"{path} is not {_NEEDS[need]} by {box.who}: {why}"
    return None


# What to do about a path a unit cannot use.
MOVE_SERVER = "put llama-server where every user may run it, such as /usr/local/bin"
INSTALL_SERVER = "install llama-server there, or set llama-server in llamad.conf to its path"
MOVE_MODEL = "keep models in /var/lib/llamad/models, readable by every user"


def config_problems(config: Config) -> list[str]:
    """Configured paths that model units (or llamad.service, for the preset) cannot see
    or read, one sentence each, for `llamad check-config` and llamad's start."""
    box = for_units(config.llama_server, None if config.dynamic_user else config.unit_user)
    checks = [("llama-server", config.llama_server, box, "x", MOVE_SERVER)]
    checks += [("models-dir", d, box, "d", MOVE_MODEL) for d in config.models_dirs]
    if config.models_preset is not None:
        # Read by llamad.service as root: only what its sandbox hides matters.
        # llamad.service has the model units' PrivateTmp= and ProtectHome=, not their
        # empty /run (it needs the backends' sockets there).
        as_root = Sandbox(tuple(h for h in box.hidden if h[1] != _TMPFS), "root",
                          "llamad.service")
        checks.append(("models-preset", config.models_preset, as_root, "r",
                       "keep it in /etc/llamad"))
    cache = cache_dir(config) if config.llama_cache else None
    if cache is not None and cache.exists():
        checks.append(("llama-cache-dir", cache, box, "d",
                       "set llama-cache-dir to a directory every user may read"))
    if config.ollama_models is not None and config.ollama_models.exists():
        checks.append(("ollama-models", config.ollama_models, box, "d",
                       "point Ollama's OLLAMA_MODELS where every user may read, or move the "
                       "store there"))
    where = config.path or "configuration"
    out = [f"{where}: {p}" for p in token_problems(config.hf_token_file)]
    for key, path, sandbox, need, fix in checks:
        found = problem(path, sandbox, need)
        if found:
            out.append(f"{where}: {key}: {found}; {fix}." if path.exists() else
                       f"{where}: {key}: {found}.")
    return out


def server_problems(config: Config, servers: dict[str, Path]) -> list[str]:
    """The same check for the llama-server binaries presets name (`where` -> path)."""
    box = for_units(config.llama_server, None if config.dynamic_user else config.unit_user)
    out = []
    for where, path in servers.items():
        found = problem(path, box, "x")
        if found:
            out.append(f"{where}: llama-server: {found}; {MOVE_SERVER}.")
    return out


def token_problems(path: Path | None) -> list[str]:
    """hf-token-file: systemd hands it to download units (LoadCredential=), so it must be
    there; and it is a secret, for root's eyes alone."""
    if path is None:
        return []
    try:
        st = path.stat()
    except OSError as e:
        return [f"hf-token-file: {path} cannot be read ({e.strerror}); downloads will fail."]
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        return [f"hf-token-file: {path} is readable by group or others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 it."]
    return []


_NEEDS = {"x": "executable", "r": "readable", "d": "reachable"}


def hidden(path: Path, box: Sandbox) -> str | None:
    """The hidden place `path` is in, as written or resolved, and how units see it."""
    for candidate in dict.fromkeys((Path(os.path.abspath(path)), Path(os.path.realpath(path)))):
        for prefix, how in box.hidden:
            if candidate == Path(prefix) or Path(prefix) in candidate.parents:
                return f"{prefix}, which {box.units} see as {how}"
    return None


def _unreadable(path: Path, box: Sandbox, need: str) -> str | None:
    """The first component on the way to `path` that the unit's user may not pass."""
    ids = _ids(box.user)
    if ids is None:
        return f"user {box.user!r} does not exist"
    steps = [(p, "x") for p in reversed(path.parents)] + [(path, need)]
    for step, want in steps:
        try:
            st = step.stat()
        except OSError:
            continue  # a dangling step of the literal path; its resolved twin is checked
        if not _allowed(st, ids, want):
            kind = "directory" if stat.S_ISDIR(st.st_mode) else "file"
            return f"{kind} {step} has mode {stat.S_IMODE(st.st_mode):04o}"
    return None


def user_exists(user: str) -> bool:
    return _ids(user) is not None


def _ids(user: str | None) -> tuple[int, Sequence[int]] | None:
    """(uid, gids) of a named user; a dynamic user is (-1, ()): never owner nor group."""
    if user is None:
        return -1, ()
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return None
    gids = [pw.pw_gid, *(g.gr_gid for g in grp.getgrall() if user in g.gr_mem)]
    return pw.pw_uid, gids


def _allowed(st: os.stat_result, ids: tuple[int, Sequence[int]], want: str) -> bool:
    uid, gids = ids
    if uid == 0:
        return True
    shift = 6 if st.st_uid == uid else 3 if st.st_gid in gids else 0
    bits = {"r": stat.S_IROTH, "x": stat.S_IXOTH, "d": stat.S_IXOTH}
    return all(st.st_mode & (bits[w] << shift) for w in want)
