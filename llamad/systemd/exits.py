"""Why a model's unit stopped, as one sentence that names the likely cause.

systemd reports a unit's end as a Result plus the main process's exit code and status
(`last`, from the unit's D-Bus properties). Statuses 200 to 245 are systemd's own: the
process failed while systemd set it up, before llama-server ran. The sentence goes into
the model's failure reason (`/v1/models`, 503 bodies) and llamad's journal.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llamad.systemd import unitpaths
from llamad.systemd.units import UnitSpec

# systemd.exec(5), "Process Exit Codes": status -> (systemd's name, the step that failed).
# tests/integration/test_exits.py checks the names against the box's systemd.
SYSTEMD_STATUSES: dict[int, tuple[str, str]] = {
    200: ("CHDIR", "changing to the working directory"),
    201: ("NICE", "setting the process priority"),
    202: ("FDS", "closing or passing file descriptors"),
    203: ("EXEC", "executing llama-server"),
    204: ("MEMORY", "allocating memory for the new process"),
    205: ("LIMITS", "setting resource limits"),
    206: ("OOM_ADJUST", "setting the OOM score"),
    207: ("SIGNAL_MASK", "setting the signal mask"),
    208: ("STDIN", "setting up standard input"),
    209: ("STDOUT", "connecting standard output to the journal"),
    210: ("CHROOT", "changing the root directory"),
    211: ("IOPRIO", "setting the I/O priority"),
    212: ("TIMERSLACK", "setting the timer slack"),
    213: ("SECUREBITS", "setting the process's securebits"),
    214: ("SETSCHEDULER", "setting the CPU scheduling policy"),
    215: ("CPUAFFINITY", "setting the CPU affinity"),
    216: ("GROUP", "setting the unit's group"),
    217: ("USER", "setting the unit's user"),
    218: ("CAPABILITIES", "dropping capabilities"),
    219: ("CGROUP", "setting up the unit's control group"),
    220: ("SETSID", "creating a new session"),
    221: ("CONFIRM", "asking for confirmation to start"),
    222: ("STDERR", "connecting standard error to the journal"),
    224: ("PAM", "opening the PAM session"),
    225: ("NETWORK", "setting up the private network"),
    226: ("NAMESPACE", "setting up the sandbox's file system namespace"),
    227: ("NO_NEW_PRIVILEGES", "setting NoNewPrivileges="),
    228: ("SECCOMP", "installing the system call filter"),
    229: ("SELINUX_CONTEXT", "setting the SELinux context"),
    230: ("PERSONALITY", "setting the execution domain"),
    231: ("APPARMOR", "applying the AppArmor profile"),
    232: ("ADDRESS_FAMILIES", "restricting socket address families"),
    233: ("RUNTIME_DIRECTORY", "creating the runtime directory for the backend's socket"),
    235: ("CHOWN", "changing the owner of the unit's directories"),
    236: ("SMACK_PROCESS_LABEL", "setting the SMACK label"),
    237: ("KEYRING", "setting up the kernel keyring"),
    238: ("STATE_DIRECTORY", "creating the state directory"),
    239: ("CACHE_DIRECTORY", "creating the cache directory"),
    240: ("LOGS_DIRECTORY", "creating the logs directory"),
    241: ("CONFIGURATION_DIRECTORY", "creating the configuration directory"),
    242: ("NUMA_POLICY", "setting the NUMA policy"),
    243: ("CREDENTIALS", "passing credentials"),
    244: ("BPF", "loading the BPF programs of the IP address filter"),
    245: ("KSM", "setting up kernel samepage merging"),
}

# The likely cause, where llamad's units make one much likelier than the others.
_HINTS = {
    203: "llama-server's file is missing, not executable by every user, built for another "
         "machine, or under a directory the unit's sandbox hides (/tmp, /var/tmp)",
    209: "the journal (systemd-journald) is not running",
    217: "unit-user in llamad.conf names no existing user, or systemd could not allocate a "
         "dynamic user",
    222: "the journal (systemd-journald) is not running",
    226: "a path the sandbox mounts does not exist, or this kernel or container refuses the "
         "mount namespaces systemd needs",
    228: "this kernel does not support seccomp system call filters",
    233: "/run/llamad, where backends put their sockets, cannot be written",
    244: "this kernel cannot attach BPF programs to cgroups (IPAddressDeny=)",
    # Not systemd's: the dynamic loader's status when a library is missing.
    127: "a shared library llama-server needs is missing (its log lines name it)",
}

# Results without an exit status of the main process (systemd.exec(5), $SERVICE_RESULT).
_RESULTS = {
    "timeout": "it did not start or stop within its timeout",
    "start-limit-hit": "it was restarted too often (start-limit-burst in llamad.conf)",
    "resources": "systemd could not set up its resources, such as its sandbox's directories",
    "watchdog": "its watchdog timed out",
    "protocol": "it broke the service protocol",
}
OOM = "out of memory (killed by the kernel's OOM killer in its cgroup)"


def describe(last: Mapping[str, Any], spec: UnitSpec | None = None,
             models: Sequence[Path] = ()) -> str:
    """One sentence (no full stop) for the unit's last end. With the unit's `spec` and
    its model files, a path the sandbox hides or the unit's user cannot read is named."""
    result = last.get("Result", "unknown")
    code, status = last.get("ExecMainCode", 0), last.get("ExecMainStatus", 0)
    if result == "oom-kill":
        return OOM
    if code in (2, 3):
        core = ", dumping core" if code == 3 else ""
        return f"llama-server was killed by signal {status} ({_signal(status)}){core}"
    if code != 1:
        meaning = _RESULTS.get(result)
        return f"systemd result {result!r}" + (f": {meaning}" if meaning else "")
    if status in SYSTEMD_STATUSES:
        name, step = SYSTEMD_STATUSES[status]
        text = f"systemd failed {step} (exit status {status}/{name})"
    else:
        text = f"llama-server ended with exit status {status}"
    cause = _cause(status, spec, models)
    return f"{text}; likely cause: {cause}" if cause else text


def _cause(status: int, spec: UnitSpec | None, models: Sequence[Path]) -> str | None:
    if spec is not None:
        box = unitpaths.sandbox(spec)
        if status == 203:
            server = Path(spec.argv[0])
            found = unitpaths.problem(server, box, "x")
            if found:
                missing = not server.exists() and not unitpaths.hidden(server, box)
                fix = unitpaths.INSTALL_SERVER if missing else unitpaths.MOVE_SERVER
                return f"{found}; {fix}"
        if status == 217 and spec.user is not None and not unitpaths.user_exists(spec.user):
            return f"user {spec.user!r} (unit-user in llamad.conf) does not exist"
        if status not in SYSTEMD_STATUSES:
            for path in models:
                found = unitpaths.problem(path, box, "r")
                if found:
                    return f"the model file {found}; {unitpaths.MOVE_MODEL}"
    return _HINTS.get(status)


def _signal(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown signal"
