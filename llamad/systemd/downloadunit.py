"""The units that download and remove models: `llamad-download@<model>.service` runs the
downloader (catalog/fetch.py), `llamad-remove@<model>.service` the same program with
--remove. llamad starts them over D-Bus and never forks either.

Each is sandboxed as tightly as the job allows: it writes nothing but the llama.cpp cache
(ProtectSystem=strict, ReadWritePaths=), reaches the network (the hub) but no device,
kernel knob or other process, and holds no capability. It runs as root without
capabilities, as llamad itself does, rather than as a DynamicUser=: the cache is shared
with `llama-server -hf` and outlives every unit, and files a dynamic user leaves behind
belong to a UID systemd may give to another unit later; root's files stay put, and every
model unit can read them. The hub's token, if any, is a credential (LoadCredential=), never
a command-line argument or an Environment= entry, which every local user may read.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llamad.systemd import unitpaths
from llamad.systemd.unitname import UNIT_NAME_MAX, instance_name
from llamad.systemd.units import SANDBOX, USEC

DOWNLOAD_PREFIX = "llamad-download@"
REMOVE_PREFIX = "llamad-remove@"
SUFFIX = ".service"
DOWNLOAD_PATTERN = f"{DOWNLOAD_PREFIX}*{SUFFIX}"
MODEL_ENV = "LLAMAD_DOWNLOAD"  # the name a download unit fetches, for a later llamad
TOKEN_CREDENTIAL = "hf-token"
EXIT_PERMANENT = 65  # the downloader's "trying again cannot help" (fetch.EXIT_PERMANENT)
PLAN_TIMEOUT = 120.0  # seconds the downloader may take to ask the hub before READY=1
# Where the downloader's python and llamad itself live. A developer's clone (or its venv)
# in a place the unit's sandbox hides (/tmp, /var/tmp) is bound back in, read-only.
CODE = (Path(sys.prefix), Path(__file__).resolve().parents[2])


def hidden_code(props: Sequence[tuple[str, bytes, Any]],
                code: Sequence[Path] = CODE) -> list[str]:
    """Which of `code` a unit with these transient properties cannot see (to bind back)."""
    box = unitpaths.Sandbox(unitpaths.hidden_places(props), "root", "this unit")
    return [str(p) for p in dict.fromkeys(code) if unitpaths.hidden(p, box)]


def download_unit(name: str) -> str:
    return _unit(DOWNLOAD_PREFIX, name)


def remove_unit(name: str) -> str:
    return _unit(REMOVE_PREFIX, name)


def _unit(prefix: str, name: str) -> str:
    # Their prefixes are longer than llama-server@'s, and they have PrivateTmp= too: the
    # whole name must fit UNIT_NAME_MAX (unitname.py says why).
    limit = UNIT_NAME_MAX - len(prefix) - len(SUFFIX)
    return f"{prefix}{instance_name(name, limit)}{SUFFIX}"


def argv(python: str, cache: Path, endpoint: str, name: str, remove: bool = False,
         ) -> list[str]:
    return [python, "-m", "llamad.catalog.fetch", "--cache", str(cache),
            *(["--remove"] if remove else ["--endpoint", endpoint]), "--", name]


def properties(name: str, command: list[str], cache: Path, token_file: Path | None,
               remove: bool = False, code: Sequence[Path] = CODE,
               ) -> list[tuple[str, bytes, Any]]:
    """StartTransientUnit's properties of the unit that downloads (or removes) `name`."""
    what = "removal" if remove else "download"
    props: list[tuple[str, bytes, Any]] = [
        ("Description", b"s", f"llamad {what} of {name}"),
        ("ExecStart", b"a(sasb)", [(command[0], command, False)]),
        ("Environment", b"as", [f"{MODEL_ENV}={name}", "PYTHONDONTWRITEBYTECODE=1"]),
        # A failed unit stays (its status text says why) until llamad has read it.
        ("CollectMode", b"s", "inactive"),
        ("TimeoutStopUSec", b"t", 10 * USEC),
        ("KillMode", b"s", "control-group"),
        ("Nice", b"i", 10),  # behind the models' own work on a busy machine
        ("MemoryMax", b"t", 512 * 1024**2),
        ("TasksMax", b"t", 16),
        ("UMask", b"u", 0o022),  # readable by every model unit's dynamic user
        *SANDBOX,
        ("ReadWritePaths", b"as", [str(cache)]),
        ("PrivateDevices", b"b", True),
        ("PrivateIPC", b"b", True),
        ("MemoryDenyWriteExecute", b"b", True),
        ("RestrictAddressFamilies", b"(bas)", (True, ["AF_UNIX", "AF_INET", "AF_INET6"])),
    ]
    hidden = hidden_code(props, code)
    if hidden:
        props.append(("BindReadOnlyPaths", b"a(ssbt)", [(p, p, False, 0) for p in hidden]))
    # The downloader's STATUS= lines (JSON) say how far it got, or why it failed.
    props.append(("NotifyAccess", b"s", "main"))
    if remove:
        # Nothing to reach; done when the program ends.
        return [*props, ("Type", b"s", "exec"), ("PrivateNetwork", b"b", True)]
    props += [
        # READY=1 once the hub has said which files: a start that fails tells why at once.
        ("Type", b"s", "notify"),
        # Done, it stays `active (exited)` with its last status, until llamad has read it.
        ("RemainAfterExit", b"b", True),
        ("TimeoutStartUSec", b"t", int(PLAN_TIMEOUT * USEC)),
        # A transfer that kept failing (75) starts again and resumes; a refusal (65) not.
        ("Restart", b"s", "on-failure"),
        ("RestartUSec", b"t", 5 * USEC),
        ("RestartPreventExitStatus", b"(aiai)", ([EXIT_PERMANENT], [])),
        ("StartLimitBurst", b"u", 5),
        ("StartLimitIntervalUSec", b"t", 600 * USEC),
    ]
    if token_file is not None:
        props.append(("LoadCredential", b"a(ss)", [(TOKEN_CREDENTIAL, str(token_file))]))
    return props
