"""A unit's end as a sentence: systemd's exit statuses, signals, and the likely cause."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from helpers import readme

from llamad.systemd import exits
from llamad.systemd.units import UnitSpec


def ended(status: int, code: int = 1, result: str = "exit-code") -> dict[str, Any]:
    return {"Result": result, "ExecMainCode": code, "ExecMainStatus": status}


def spec(server: str) -> UnitSpec:
    return UnitSpec(name="llama-server@m.service", description="m", argv=(server, "-m", "x"))


def test_every_systemd_status_has_a_name_and_a_step() -> None:
    # 223 and 234 are reserved (once tcpwrap and kdbus); the others are systemd's own.
    assert sorted(exits.SYSTEMD_STATUSES) == [s for s in range(200, 246) if s not in (223, 234)]
    for status, (name, step) in exits.SYSTEMD_STATUSES.items():
        text = exits.describe(ended(status))
        assert text.startswith(f"systemd failed {step} (exit status {status}/{name})"), text


def test_exec_failure_names_the_hidden_binary(tmp_path: Path) -> None:
    server = tmp_path / "llama-server"
    server.write_text("")
    server.chmod(0o755)
    text = exits.describe(ended(203), spec(str(server)))
    assert text == (f"systemd failed executing llama-server (exit status 203/EXEC); likely "
                    f"cause: {server} is under /tmp, which model units see as an empty "
                    "private directory (PrivateTmp=yes); put llama-server where every user "
                    "may run it, such as /usr/local/bin")
    missing = Path("/usr/local/lib/llamad-test-none/llama-server")
    assert exits.describe(ended(203), spec(str(missing))).endswith(
        f"likely cause: {missing} does not exist; install llama-server there, or set "
        "llama-server in llamad.conf to its path")
    hidden_and_missing = tmp_path / "none" / "llama-server"
    assert exits.describe(ended(203), spec(str(hidden_and_missing))).endswith(
        "(PrivateTmp=yes); put llama-server where every user may run it, such as "
        "/usr/local/bin")
    # Without the unit at hand, the usual causes.
    assert "missing, not executable by every user" in exits.describe(ended(203))


def test_user_failure_names_a_missing_unit_user() -> None:
    ghost = UnitSpec(name="llama-server@m.service", description="m", argv=("/x",),
                     user="no-such-user-here")
    assert exits.describe(ended(217), ghost) == (
        "systemd failed setting the unit's user (exit status 217/USER); likely cause: user "
        "'no-such-user-here' (unit-user in llamad.conf) does not exist")
    assert "could not allocate a dynamic user" in exits.describe(ended(217), spec("/x"))


def test_unreadable_model_is_the_likely_cause(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_text("")
    text = exits.describe(ended(1), spec("/usr/bin/true"), [model])
    assert text == (f"llama-server ended with exit status 1; likely cause: the model file "
                    f"{model} is under /tmp, which model units see as an empty private "
                    "directory (PrivateTmp=yes); keep models in /var/lib/llamad/models, "
                    "readable by every user")
    # A model the unit can read: llama-server's own failure, told as such.
    shared = Path("/usr/share/common-licenses/GPL-3")
    assert exits.describe(ended(1), spec("/usr/bin/true"), [shared]) == \
        "llama-server ended with exit status 1"


def test_signals_oom_and_other_results() -> None:
    assert exits.describe(ended(9, code=2, result="signal")) == \
        "llama-server was killed by signal 9 (SIGKILL)"
    assert exits.describe(ended(6, code=3, result="core-dump")) == \
        "llama-server was killed by signal 6 (SIGABRT), dumping core"
    assert exits.describe({"Result": "oom-kill"}) == exits.OOM
    assert exits.describe({"Result": "timeout"}) == \
        "systemd result 'timeout': it did not start or stop within its timeout"
    assert exits.describe({"Result": "success"}) == "systemd result 'success'"
    assert "shared library" in exits.describe(ended(127))


def test_the_readmes_sentences_are_llamads() -> None:
    """README.md quotes llamad's failure reasons to a new user: they must be what it says."""
    text = readme.README.read_text()
    [example] = re.findall(r"^```text\n(model gemma failed: .*?)^```$", text, re.M | re.S)
    server = "/var/tmp/llama-server"
    assert " ".join(example.split()) == \
        f"model gemma failed: {exits.describe(ended(203), spec(server))}"
    [gomp] = re.findall(r'fails every load with "(llama-server ended with .*?)"', text, re.S)
    assert exits.describe(ended(127)).startswith(" ".join(gomp.split()))
