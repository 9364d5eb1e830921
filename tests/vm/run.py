"""`make test-vm`: llamad's .deb on a real Debian 13 kernel (cgroup v2), under qemu.

The nspawn box shares this machine's kernel, whose cgroups may be v1: memory limits, OOM
kills, MemoryCurrent/MemoryPeak and IP address filters never act there. This boots
Debian 13's own kernel and systemd in a VM (TCG: no KVM needed) once, with

- disk 1, the cached image (image.py), read-only to the guest through `-snapshot`;
- disk 2, this run's: the freshly built .debs (dist/, `make deb`), llama-server and
  ggml-rpc-server, the Gemma model and tests/vm/guest/, made with `mkfs.ext4 -d`.

At boot the guest's llamad-vm-tests.service runs guest/run: it installs the packages,
runs the guest's pytest suite and writes its results to disk 2, then powers off. The
console (ttyS0) streams here as it goes; afterwards `debugfs` copies the results off
disk 2 into test-artifacts/vm/ (no mounts anywhere). qemu never outlives this script.

Exit status: the guest suite's, or 1 when the VM did not finish (boot or timeout).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import rig
from vm import image

HERE = Path(__file__).resolve().parent
ARTIFACTS = image.REPO / "test-artifacts" / "vm"
GUEST_MEMORY_MB = 3072
# The guest's marks on the console, written by guest/run.
UP_MARK = "llamad-vm: guest up"
DONE_MARK = "llamad-vm: done"
# The kernel's own last words. Before UP_MARK they cannot be llamad's doing: nothing of
# llamad runs yet. Multi-threaded TCG rarely loses a race with the kernel's live code
# patching at boot (an int3 Oops in patched code, then a panic); a second boot passes.
PANIC_MARK = "Kernel panic - not syncing"
BOOTS = 2


def say(text: str) -> None:
    print(f"vm: {text}", file=sys.stderr, flush=True)


def missing() -> str | None:
    """One sentence saying why the VM cannot run here, or None."""
    if os.geteuid() != 0:
        return "the VM tier needs root (debootstrap, chroot) to build its image"
    for tool, pkg in (("qemu-system-x86_64", "qemu-system-x86"), ("debugfs", "e2fsprogs"),
                      ("debootstrap", "debootstrap")):
        if not shutil.which(tool):
            return f"the VM tier needs {tool}: apt-get install {pkg}"
    for path in (rig.LLAMA_SERVER, rig.RPC_SERVER, rig.GEMMA):
        if not path.exists():
            return f"the VM tier needs {path}: run `make dev`"
    if not debs():
        return "the VM tier needs the .debs in dist/: run `make deb`"
    return None


def debs() -> list[Path]:
    return sorted((image.REPO / "dist").glob("llamad*_all.deb"))


def run_disk(work: Path) -> Path:
    """Disk 2: what this run brings in, and room for the results."""
    stage = work / "stage"
    for sub in ("debs", "bin", "models", "results"):
        (stage / sub).mkdir(parents=True)
    for deb in debs():
        shutil.copy(deb, stage / "debs")
    for binary in (rig.LLAMA_SERVER, rig.RPC_SERVER):
        shutil.copy(binary, stage / "bin")
    _link(rig.GEMMA, stage / "models" / "gemma.gguf")
    shutil.copytree(HERE / "guest", stage / "guest",
                    ignore=shutil.ignore_patterns("__pycache__"))
    # The guest's tests import their helpers as vm.guest.vmguest, as here (PYTHONPATH is
    # /srv/vm/tests there).
    (stage / "tests" / "vm").mkdir(parents=True)
    (stage / "tests" / "vm" / "guest").symlink_to("../../guest")
    (stage / "results").chmod(0o777)
    size = sum(f.stat().st_size for f in stage.rglob("*") if f.is_file())
    disk = work / "run.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "llamad-vm", "-d", str(stage), str(disk),
                    f"{size // 2**20 + 256}M"], check=True, capture_output=True)
    shutil.rmtree(stage)
    return disk


def _link(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:  # another file system
        shutil.copy(src, dest)


def qemu_argv(base: Path, disk: Path, cpus: int) -> list[str]:
    cmdline = ("root=LABEL=root rw console=ttyS0 quiet panic=-1 "
               "systemd.show_status=error")
    return ["qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", "max",
            "-m", str(GUEST_MEMORY_MB), "-smp", str(cpus), "-nodefaults", "-no-reboot",
            "-display", "none", "-monitor", "none", "-serial", "stdio", "-nic", "none",
            "-kernel", str(base / "vmlinuz"), "-initrd", str(base / "initrd.img"),
            "-append", cmdline,
            "-drive", f"file={base / 'root.img'},if=virtio,format=raw,snapshot=on",
            "-drive", f"file={disk},if=virtio,format=raw"]


@contextlib.contextmanager
def running(argv: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    """qemu in its own process group, killed on the way out whatever happens."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


class Console:
    """The guest's ttyS0, echoed here line by line and kept in a log, with the times of
    the guest's marks."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path, start: float) -> None:
        self.start = start
        self.up: float | None = None
        self.done: float | None = None
        self.panicked_before_up = False
        self._log = open(log, "wb")  # noqa: SIM115 - closed by the reader thread
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        with self._log:
            for raw in proc.stdout:
                self._log.write(raw)
                line = raw.decode(errors="replace").rstrip("\r\n")
                now = time.monotonic() - self.start
                if UP_MARK in line and self.up is None:
                    self.up = now
                if DONE_MARK in line:
                    self.done = now
                if PANIC_MARK in line and self.up is None:
                    self.panicked_before_up = True
                print(f"[{now:6.1f}] {line}", flush=True)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def collect(disk: Path, dest: Path) -> None:
    """The guest's results/ off disk 2, with debugfs: no mount."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    subprocess.run(["debugfs", "-R", f"rdump /results {dest}", str(disk)],
                   check=False, capture_output=True)


def boot(cpus: int, timeout: float) -> int:
    start = time.monotonic()
    base = image.image()
    built = time.monotonic()
    ARTIFACTS.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, BOOTS + 1):
        with tempfile.TemporaryDirectory(prefix="llamad-vm-", dir="/var/tmp") as tmp:
            staged, console = run_vm(base, Path(tmp), cpus, timeout)
        if not console.panicked_before_up or attempt == BOOTS:
            break
        say("the guest's kernel panicked before its userspace started, so before any of "
            "llamad ran: booting once more")
    ended = time.monotonic()
    rc_file = ARTIFACTS / "results" / "rc"
    rc = int(rc_file.read_text()) if rc_file.exists() else 1
    up = f"{console.up:.0f} s" if console.up is not None else "never"
    tests = (f"{console.done - console.up:.0f} s" if console.done and console.up
             else "unfinished")
    say(f"image {built - start:.0f} s, boots {attempt}, disk {staged - built:.0f} s, guest up "
        f"after {up}, tests {tests}, VM {ended - staged:.0f} s, total {ended - start:.0f} s")
    say(f"results in {ARTIFACTS.relative_to(image.REPO)}/ "
        f"({'passed' if rc == 0 else 'FAILED'})")
    return rc


def run_vm(base: Path, work: Path, cpus: int, timeout: float) -> tuple[float, Console]:
    """One boot with a fresh disk 2, its results copied into ARTIFACTS: (when the disk
    was ready, the console)."""
    disk = run_disk(work)
    staged = time.monotonic()
    say(f"booting Debian 13 under qemu (TCG, {cpus} vCPUs, {GUEST_MEMORY_MB} MiB); "
        f"the console follows")
    with running(qemu_argv(base, disk, cpus)) as proc:
        console = Console(proc, work / "console.log", time.monotonic())
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            say(f"the VM did not finish within {timeout:.0f} s; stopping it")
        console.join(5)
    collect(disk, ARTIFACTS)
    shutil.copy(work / "console.log", ARTIFACTS / "console.log")
    return staged, console


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpus", type=int, default=2, help="the guest's vCPUs (2)")
    parser.add_argument("--timeout", type=float, default=2400,
                        help="seconds the VM may run, boot included (2400)")
    opts = parser.parse_args()
    reason = missing()
    if reason:
        say(reason)
        return 1
    # A CI timeout's SIGTERM unwinds like ^C: qemu is stopped on the way out.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return boot(opts.cpus, opts.timeout)
    except KeyboardInterrupt:
        say("interrupted; the VM was stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
