"""The Debian 13 disk image the VM tier boots, built once and cached.

`debootstrap --variant=minbase` of trixie with Debian's kernel and what llamad's .deb
depends on (so dpkg installs it in the guest without a network), turned into an ext4
image with `mkfs.ext4 -d` (no mounts, no loop devices). The guest boots Debian's own
kernel and initrd straight from qemu (`-kernel`, `-initrd`); the image is never
written to (qemu's `-snapshot`), so one image serves every run.

Cached as ~/.cache/llamad-ci/vm-debian-13-<hash>/ (root.img, vmlinuz, initrd.img), the
hash over the package list and the guest's fixed files below: change either and the
next run builds a new image (about 5 minutes and 700 MB, most of it debootstrap).
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))

import rig

REPO = Path(__file__).resolve().parent.parent.parent
CONTROL = REPO / "packaging" / "debian" / "control"
# A kernel, an init and a bus; iproute2 for the guest's test network (a dummy link),
# libgomp1 for the llama-server `make dev` builds, python3-pytest to run the guest's tests.
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "udev", "kmod", "linux-image-amd64",
                 "iproute2", "procps", "curl", "libgomp1", "python3", "python3-pytest")
IMAGE_SIZE = "3G"
# The guest's test run: a oneshot service started at boot, which runs the script on the
# run disk (tests/vm/guest/run, copied there by run.py) and powers the guest off.
TEST_UNIT = """\
[Unit]
Description=llamad VM tests
After=multi-user.target srv-vm.mount
Requires=srv-vm.mount

[Service]
Type=oneshot
ExecStart=/srv/vm/guest/run
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
TimeoutStartSec=infinity
ExecStopPost=/usr/bin/systemctl --no-block poweroff

[Install]
WantedBy=multi-user.target
"""
FSTAB = """\
LABEL=root / ext4 defaults 0 1
LABEL=llamad-vm /srv/vm ext4 defaults 0 2
"""
FILES = {
    "etc/fstab": FSTAB,
    "etc/hostname": "llamad-vm\n",
    "etc/systemd/system/llamad-vm-tests.service": TEST_UNIT,
}


def depends() -> tuple[str, ...]:
    """The python3-* packages llamad's .deb depends on (packaging/debian/control)."""
    text = CONTROL.read_text()
    block = text.split("\nDepends:", 1)[1].split("\nRecommends:", 1)[0]
    return tuple(sorted({w.strip(" ,") for w in block.split() if w.startswith("python3-")}))


def packages() -> tuple[str, ...]:
    return (*BASE_PACKAGES, *depends())


def cache_dir() -> Path:
    key = "\n".join([*packages(), *(f"{k}={v}" for k, v in sorted(FILES.items())),
                     IMAGE_SIZE])
    return rig.CACHE / ("vm-debian-13-" + hashlib.sha256(key.encode()).hexdigest()[:8])


def say(text: str) -> None:
    print(f"vm: {text}", file=sys.stderr, flush=True)


def image() -> Path:
    """The cached image's directory, built first if missing. One process builds while
    others wait."""
    dest = cache_dir()
    if (dest / "root.img").exists():
        return dest
    rig.CACHE.mkdir(parents=True, exist_ok=True)
    with open(rig.CACHE / ".vm-image.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dest / "root.img").exists():
            _build(dest)
    return dest


def _build(dest: Path) -> None:
    for tool in ("debootstrap", "mkfs.ext4"):
        if not shutil.which(tool):
            raise SystemExit(f"vm: building the Debian 13 image needs {tool}: run `make dev`")
    part = dest.with_name(dest.name + ".part")
    root = part / "root"
    rig._unmount_under(part)  # an interrupted debootstrap leaves /proc mounted there
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    say(f"building the Debian 13 image in {dest} (about 5 minutes, once)")
    out = subprocess.run(["debootstrap", "--variant=minbase",
                          "--include=" + ",".join(packages()), "trixie", str(root),
                          rig.debian_mirror()], capture_output=True, text=True, check=False)
    rig._unmount_under(part)
    if out.returncode:
        raise SystemExit(f"vm: debootstrap of Debian 13 failed:\n{out.stdout[-3000:]}"
                         f"{out.stderr[-2000:]}")
    _configure(root)
    boot = root / "boot"
    kernel = next(boot.glob("vmlinuz-*"))
    shutil.copy(kernel, part / "vmlinuz")
    shutil.copy(boot / kernel.name.replace("vmlinuz", "initrd.img"), part / "initrd.img")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(root),
                    str(part / "root.img"), IMAGE_SIZE], check=True)
    shutil.rmtree(root)
    part.rename(dest)
    say(f"built {dest}")


def _configure(root: Path) -> None:
    for rel, text in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "srv/vm").mkdir(parents=True, exist_ok=True)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "llamad-vm-tests.service").symlink_to("../llamad-vm-tests.service")
    # A getty on ttyS0 would hang up the console (vhangup) under the tests' output.
    (root / "etc/systemd/system/serial-getty@ttyS0.service").symlink_to("/dev/null")


if __name__ == "__main__":
    print(image())
