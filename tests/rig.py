"""A throwaway systemd for tests on machines whose PID 1 is not systemd.

The box is the host root (or a cached Debian 13 root: `Box(debian13_root())`) seen
through an overlay whose upper layer is a tmpfs, booted with `systemd-nspawn --boot`.
Everything systemd writes (tmpfiles cleaning /tmp included) lands in that tmpfs, never
on the host. The host reaches the box's system bus through /proc/<init>/root, and
shares its network.

Usable outside pytest too (tools/demo, bench/): `with Box() as box: ...`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

CACHE = Path(os.environ.get("LLAMAD_CACHE", Path.home() / ".cache" / "llamad-ci"))
# tools/setup-dev builds llama-server with the RPC backend, and its worker, in one place.
LLAMA_BUILD = CACHE / "llama-11434.0.0-rpc"
LLAMA_SERVER = LLAMA_BUILD / "llama-server"
RPC_SERVER = LLAMA_BUILD / "ggml-rpc-server"
GEMMA = CACHE / "models" / "gemma3-270m-q4_k_m.gguf"
WEB_UI = CACHE / "ui-11434.0.0"  # llama.cpp's web UI, built by tools/setup-dev
# Not under /tmp or /var/tmp: units with PrivateTmp=yes would not see them.
RIG_ROOT = Path("/var/lib/llamad-rig")
BOX_PREFIX = "llamad-box-"
# Debian 13 for the package tests: debootstrap's minimal root with an init to boot, plus
# what `make dev` leaves on a machine and the tests use: curl (the README's quick start),
# libgomp1 (the OpenMP runtime the llama-server built here links), procps (pgrep).
DEBIAN13_PACKAGES = ("systemd", "systemd-sysv", "dbus", "procps", "curl", "libgomp1")
DEBIAN13_ROOT = CACHE / ("debian-13-" + hashlib.sha256(
    " ".join(DEBIAN13_PACKAGES).encode()).hexdigest()[:8])


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 30.0,
             interval: float = 0.05) -> T:
    """Poll `probe` until it returns something truthy; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def missing_requirements() -> str | None:
    """One sentence saying why the box can't run here, or None."""
    if os.geteuid() != 0:
        return "integration tests need root to mount an overlay and run systemd-nspawn"
    if not shutil.which("systemd-nspawn"):
        return "integration tests need systemd-nspawn (apt-get install systemd-container)"
    for path in (LLAMA_SERVER, GEMMA):
        if not path.exists():
            return f"integration tests need {path}; run `make dev` first"
    return None


def debian_mirror() -> str:
    """The Debian archive apt's sources on this machine name (debootstrap's default else)."""
    out = subprocess.run(["apt-get", "indextargets", "--format", "$(SITE) $(LABEL) $(TARGET_OF)"],
                         capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
        site, label, kind = [*line.split(), "", "", ""][:3]
        if label == "Debian" and kind == "deb":
            return site
    return "http://deb.debian.org/debian"


def debian13_root() -> Path:
    """The cached Debian 13 (trixie) root, built by debootstrap on first use (about a minute
    and 250 MB; `make dev` builds it too). One process builds it while others wait."""
    if DEBIAN13_ROOT.is_dir():
        return DEBIAN13_ROOT
    if not shutil.which("debootstrap"):
        raise RuntimeError("the Debian 13 box needs debootstrap to build its root once; "
                           "run `make dev` (or apt-get install debootstrap)")
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".debian-13.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not DEBIAN13_ROOT.is_dir():
            part = DEBIAN13_ROOT.with_name(DEBIAN13_ROOT.name + ".part")
            _unmount_under(part)  # an interrupted debootstrap leaves /proc mounted there
            shutil.rmtree(part, ignore_errors=True)
            out = subprocess.run(["debootstrap", "--variant=minbase",
                                  "--include=" + ",".join(DEBIAN13_PACKAGES), "trixie",
                                  str(part), debian_mirror()],
                                 capture_output=True, text=True, check=False)
            if out.returncode:
                raise RuntimeError(f"debootstrap of Debian 13 failed: {out.stdout[-2000:]}"
                                   f"{out.stderr[-2000:]}")
            part.rename(DEBIAN13_ROOT)
    return DEBIAN13_ROOT


def _unmount_under(path: Path) -> None:
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for mnt in sorted((m for m in mounts if m.startswith(f"{path}/")), key=len, reverse=True):
        subprocess.run(["umount", "--lazy", mnt], check=False, capture_output=True)


class Box:
    """One booted systemd container; a context manager that always tears down."""

    def __init__(self, lower: Path = Path("/")) -> None:
        self.lower = lower  # the root the box sees, read-only, under its own changes
        # Also the machine name, which allows no underscores.
        self.root = Path("/var/tmp") / f"{BOX_PREFIX}{uuid.uuid4().hex[:12]}"
        _booted.add(self.root.name)
        self.root.mkdir(mode=0o700)
        RIG_ROOT.mkdir(mode=0o755, exist_ok=True)
        # Shared with the box at the same path through a bind mount, so files the
        # host writes later (hot-added models) show up inside immediately.
        self.workdir = Path(tempfile.mkdtemp(prefix="work-", dir=RIG_ROOT))
        self.workdir.chmod(0o755)
        self.merged = self.root / "merged"
        self.pid = 0
        self._nspawn: subprocess.Popen[bytes] | None = None
        self._log = self.root.with_suffix(".log")

    @property
    def bus_address(self) -> str:
        return f"unix:path=/proc/{self.pid}/root/run/dbus/system_bus_socket"

    def __enter__(self) -> Box:
        try:
            self._boot()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _boot(self) -> None:
        _run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(self.root)])
        for sub in ("upper", "work", "merged"):
            (self.root / sub).mkdir()
        _run(["mount", "-t", "overlay", "overlay", "-o",
              f"lowerdir={self.lower},upperdir={self.root}/upper,workdir={self.root}/work",
              str(self.merged)])
        # Boot only what tests need: the host's enabled services (a database, a
        # web server...) would otherwise start in the box and slow or block boot.
        target = self.merged / "etc/systemd/system/llamad-box.target"
        target.write_text("[Unit]\nDescription=llamad test box\nRequires=basic.target\n"
                          "After=basic.target\nAllowIsolate=yes\n")
        cgroups = self._make_cgroups()
        with open(self._log, "wb") as log:
            self._nspawn = subprocess.Popen(
                ["systemd-nspawn", f"--directory={self.merged}", "--register=no",
                 "--keep-unit", f"--uuid={uuid.uuid4().hex}", "--boot", "--console=pipe",
                 f"--bind={self.workdir}", *(f"--bind-ro={p}" for p in checkout_paths()),
                 f"--machine={self.root.name}",
                 "systemd.unit=llamad-box.target"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=lambda: _join(cgroups))
        self.pid = wait_for("the container's init", self._find_init, timeout=30)
        state = self.wait_running()
        if state != "running":
            failed = self.run("systemctl --failed --no-legend; systemctl list-jobs --no-legend",
                              check=False).stdout
            raise RuntimeError(f"box reached {state!r}, not 'running'; failed units and "
                               f"jobs left: {failed}")

    def _make_cgroups(self) -> list[Path]:
        # On a host whose PID 1 is not systemd, every box would otherwise build
        # its cgroup tree at the same place, and two boxes' units of the same
        # name would share one cgroup (and kill each other's processes).
        made = []
        for hierarchy in CGROUP_HIERARCHIES:
            if hierarchy.is_dir():
                path = hierarchy / self.root.name
                path.mkdir(exist_ok=True)
                made.append(path)
        return made

    def _find_init(self) -> int | None:
        assert self._nspawn is not None
        if self._nspawn.poll() is not None:
            raise RuntimeError(f"systemd-nspawn exited early; see {self._log}")
        children = Path(f"/proc/{self._nspawn.pid}/task/{self._nspawn.pid}/children")
        with contextlib.suppress(OSError):
            for pid in children.read_text().split():
                if Path(f"/proc/{pid}/root/run/dbus/system_bus_socket").exists():
                    return int(pid)
        return None

    def wait_running(self, timeout: float = 120) -> str:
        try:
            out = self.run(["systemctl", "is-system-running", "--wait"], check=False,
                           timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"still starting after {timeout:.0f}s"
        return out.stdout.strip()

    def run(self, cmd: str | Sequence[str], check: bool = True, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside the box (a string goes through bash -c)."""
        argv = ["bash", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
        return subprocess.run(["nsenter", "-t", str(self.pid), "-a", *argv], env=env,
                              capture_output=True, text=True, check=check, timeout=timeout,
                              input=input)

    def journal(self, *args: str) -> str:
        return self.run(["journalctl", "--no-pager", "-o", "cat", *args], check=False).stdout

    def close(self) -> None:
        if self._nspawn is not None and self._nspawn.poll() is None:
            if self.pid:
                with contextlib.suppress(subprocess.SubprocessError, OSError):
                    self.run(["systemctl", "poweroff", "--no-block"], check=False, timeout=10)
            try:
                self._nspawn.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self._nspawn.pid, 9)
                self._nspawn.wait(timeout=10)
        for mnt in (self.merged, self.root):
            if os.path.ismount(mnt):
                _run(["umount", "--lazy", str(mnt)])
        for hierarchy in CGROUP_HIERARCHIES:
            _remove_cgroup(hierarchy / self.root.name)
        with contextlib.suppress(OSError):
            self.root.rmdir()
            self._log.unlink()
        shutil.rmtree(self.workdir, ignore_errors=True)


CGROUP_HIERARCHIES = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))


def checkout_paths() -> list[Path]:
    """The checkout and its virtualenv, shown in the box at the same paths: llamad runs
    from them there. The box sees the host's root, but mounts its own /tmp, so a clone
    under /tmp would otherwise be missing."""
    here = Path(__file__).resolve().parent.parent
    venv = Path(sys.prefix).resolve()
    return [here] if venv.is_relative_to(here) else [here, venv]


def _join(cgroups: list[Path]) -> None:
    for path in cgroups:
        (path / "cgroup.procs").write_text("0")  # "0" means the writing process


def _remove_cgroup(path: Path) -> None:
    if not path.is_dir():
        return
    for sub in sorted((p for p in path.rglob("*") if p.is_dir()),
                      key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()


def _run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, capture_output=True)


class Assets:
    """The real llama-server and Gemma model, hard-linked into a box's workdir.

    Hard links cost no disk and keep the cache's world-readable modes, which
    DynamicUser units need.
    """

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / "assets"
        self.dir.mkdir(mode=0o755, exist_ok=True)
        self.llama_server = self._link(LLAMA_SERVER, "llama-server")
        self.model = self._link(GEMMA, "gemma3-270m.gguf")

    def _link(self, src: Path, name: str) -> Path:
        dest = self.dir / name
        if not dest.exists():
            os.link(src, dest)
        return dest

    def models_dir(self, name: str, models: Sequence[str]) -> Path:
        """A models directory holding the Gemma file under each of `models` names."""
        path = self.dir.parent / name
        path.mkdir(mode=0o755, exist_ok=True)
        for model in models:
            target = path / f"{model}.gguf"
            if not target.exists():
                os.link(self.model, target)
        return path


# Boxes this process booted: other test runs (other developers, CI jobs) may share the
# machine, and their boxes are not ours to report.
_booted: set[str] = set()


def leftovers() -> list[str]:
    """Containers, mounts and llama-server processes this process left behind."""
    found = []
    mounts = Path("/proc/self/mountinfo").read_text()
    found += [f"mount {line.split()[4]}" for line in mounts.splitlines()
              if any(f"/{name}" in line.split()[4] for name in _booted)]
    found += [f"cgroup {h / name}" for h in CGROUP_HIERARCHIES for name in _booted
              if (h / name).is_dir()]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            comm = (proc / "comm").read_text().strip()
            if comm in ("systemd-nspawn", "llama-server") and _ours(proc):
                found.append(f"process {proc.name} ({comm})")
    return found


def _ours(proc: Path) -> bool:
    """In one of our boxes' cgroups, or a descendant of this process."""
    cgroup = (proc / "cgroup").read_text()
    if any(name in cgroup for name in _booted):
        return True
    pid = int(proc.name)
    while pid > 1:
        if pid == os.getpid():
            return True
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return False


@contextlib.contextmanager
def booted() -> Iterator[tuple[Box, Assets]]:
    with Box() as box:
        yield box, Assets(box.workdir)


if __name__ == "__main__":
    # tools/setup-dev: `python tests/rig.py debian13` builds the cached root.
    import sys
    if sys.argv[1:] != ["debian13"]:
        sys.exit("usage: rig.py debian13")
    print(debian13_root())
