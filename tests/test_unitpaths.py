"""What model units can see and read, and the sentences for what they cannot."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from llamad.config import Config
from llamad.systemd import unitpaths, units
from llamad.systemd.units import UnitSpec

ROOT = Path(__file__).parent.parent
OPEN = unitpaths.Sandbox((), None)  # nothing hidden: only permissions count


def spec(**kw: Any) -> UnitSpec:
    return UnitSpec(name="llama-server@m.service", description="m", argv=("/x",), **kw)


def test_sandbox_follows_the_unit_properties() -> None:
    box = unitpaths.sandbox(spec())
    hidden = dict(box.hidden)
    assert "PrivateTmp=yes" in hidden["/tmp"] and "PrivateTmp=yes" in hidden["/var/tmp"]
    assert "PrivateDevices=yes" in hidden["/dev/shm"]
    # ProtectHome=read-only: homes stay visible; only their modes keep units out.
    assert "/root" not in hidden and "/home" not in hidden
    assert box.user is None and "dynamic user" in box.who
    assert unitpaths.sandbox(spec(user="llama")).who == "user 'llama'"


def test_llamad_service_hides_what_model_units_hide() -> None:
    # check-config judges the preset by the model units' sandbox: both must agree.
    text = (ROOT / "units" / "llamad.service").read_text()
    service = dict(re.findall(r"^(PrivateTmp|ProtectHome)=(\S+)$", text, re.M))
    props = {n: v for n, _, v in units.transient_properties(spec())}
    assert service == {"PrivateTmp": "yes" if props["PrivateTmp"] else "no",
                       "ProtectHome": props["ProtectHome"]}


def test_hidden_paths(tmp_path: Path) -> None:
    box = unitpaths.sandbox(spec())
    server = tmp_path / "llama-server"
    server.write_text("")
    server.chmod(0o755)
    found = unitpaths.problem(server, box, "x")
    assert found == (f"{server} is under /tmp, which model units see as an empty private "
                     "directory (PrivateTmp=yes)")
    assert "under /var/tmp" in (unitpaths.problem(Path("/var/tmp/m.gguf"), box, "r") or "")
    # A link from a visible place into a hidden one is hidden too.
    # (A checkout under /tmp or /var/tmp is hidden itself: the link goes in /var/lib then.)
    visible = next(p for p in (ROOT, Path("/var/lib")) if unitpaths.problem(p, box, "r") is None)
    link = visible / f".pytest-unitpaths-link-{os.getpid()}"
    try:
        link.symlink_to(server)
        assert "under /tmp" in (unitpaths.problem(link, box, "x") or "")
    finally:
        link.unlink()


def test_modes_for_a_dynamic_user(open_dir: Path) -> None:
    private = open_dir / "private"
    private.mkdir(mode=0o700)
    model = private / "m.gguf"
    model.write_text("")
    model.chmod(0o644)
    assert unitpaths.problem(model, OPEN, "r") == (
        f"{model} is not readable by the model units' dynamic user: directory {private} "
        "has mode 0700")
    private.chmod(0o755)
    assert unitpaths.problem(model, OPEN, "r") is None
    model.chmod(0o600)
    assert unitpaths.problem(model, OPEN, "r") == (
        f"{model} is not readable by the model units' dynamic user: file {model} has mode 0600")
    model.chmod(0o644)
    assert "not executable" in (unitpaths.problem(model, OPEN, "x") or "")
    private.chmod(0o711)  # passable, not listable: all llama-server needs
    assert unitpaths.problem(private, OPEN, "d") is None
    private.chmod(0o750)
    assert unitpaths.problem(private, OPEN, "d") == (
        f"{private} is not reachable by the model units' dynamic user: directory {private} "
        "has mode 0750")
    assert unitpaths.problem(private / "gone.gguf", OPEN, "r") == \
        f"{private / 'gone.gguf'} does not exist"


def test_modes_for_a_named_user(open_dir: Path) -> None:
    model = open_dir / "m.gguf"
    model.write_text("")
    model.chmod(0o640)
    nobody = unitpaths.Sandbox((), "nobody")
    assert "user 'nobody'" in (unitpaths.problem(model, nobody, "r") or "")
    os.chown(model, 65534, -1)  # nobody's uid on Debian
    model.chmod(0o600)
    assert unitpaths.problem(model, nobody, "r") is None
    ghost = unitpaths.Sandbox((), "no-such-user-here")
    assert unitpaths.problem(model, ghost, "r") == (
        f"{model} is not readable by user 'no-such-user-here': user 'no-such-user-here' "
        "does not exist")


@pytest.mark.parametrize("need", ["r", "x", "d"])
def test_root_reads_everything(tmp_path: Path, need: str) -> None:
    path = tmp_path / "f"
    path.write_text("")
    path.chmod(0)
    assert unitpaths.problem(path, unitpaths.Sandbox((), "root"), need) is None


def test_the_token_file_is_checked(tmp_path: Path) -> None:
    token = tmp_path / "hf-token"
    assert unitpaths.token_problems(None) == []
    assert unitpaths.token_problems(token) == [
        f"hf-token-file: {token} cannot be read (No such file or directory); downloads will "
        "fail."]
    token.write_text("hf_x\n")
    token.chmod(0o644)
    assert unitpaths.token_problems(token) == [
        f"hf-token-file: {token} is readable by group or others (mode 0644); chmod 600 it."]
    token.chmod(0o600)
    assert unitpaths.token_problems(token) == []


def test_run_is_hidden_from_model_units() -> None:
    """Model units mount an empty, read-only /run (TemporaryFileSystem=) with only their own
    socket directory bound back in: a model on a disk mounted under /run/media, which
    llamad itself sees and catalogues, fails to load; the sentence must say why."""
    box = unitpaths.sandbox(spec())
    said = unitpaths.problem(Path("/run/media/ann/disk/m.gguf"), box, "r")
    assert said is not None and "/run, which model units see as" in said, said
    assert "TemporaryFileSystem=" in said
    # llamad.service has no such /run: a preset there is read.
    preset = Path("/run/llamad-test.ini")
    problems = unitpaths.config_problems(Config.default(models_dirs=(), models_preset=preset,
                                                        llama_cache=False))
    assert not [p for p in problems if "models-preset" in p and "TemporaryFileSystem" in p]
    # Downloads have no such /run: the code they run is judged by their own sandbox.
    assert not unitpaths.hidden(Path("/run/x"), unitpaths.Sandbox(unitpaths.hidden_places(
        [("PrivateTmp", b"b", True)]), None))
