"""Opening what others put in the models directory and the llama.cpp cache, warily.

Anyone in group `llamad` chooses what lies there, and llamad reads it as root. So:

- Only regular files are opened, and never in a way that can block: a FIFO, a device node,
  a socket, a broken or looping link is refused before `open()` (a FIFO without a writer
  would hold the scan for ever), and the descriptor is opened `O_NONBLOCK` and checked
  again with `fstat` (the name may have been swapped meanwhile).
- A link that someone other than root made, leading out of the models directories and the
  cache (`confine`), is followed only to what others may read, in directories others may
  enter: what a model unit could read. A link to `/etc/shadow` or into `/root` would
  otherwise be read with root's rights (llamad has no `CAP_DAC_OVERRIDE`, but root owns
  those files), and its name or first bytes told in a problem line.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path

_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory",
          stat.S_IFLNK: "a symbolic link"}
READ, LIST = stat.S_IROTH, stat.S_IROTH | stat.S_IXOTH


class Refused(Exception):
    """Why a path is not read: a phrase that follows the path ("is a FIFO, ...")."""


def _stat(path: Path) -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError as e:
        raise Refused("is a broken symbolic link" if os.path.islink(path)
                      else f"cannot be read ({e.strerror})") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise Refused("is a symbolic link loop") from None
        raise Refused(f"cannot be read ({e.strerror})") from None


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "no regular file")


def roots(paths: Sequence[Path]) -> tuple[Path, ...]:
    """The real paths of the directories llamad scans, for `confine`."""
    return tuple(Path(os.path.realpath(p)) for p in paths)


def confine(path: Path, within: Sequence[Path], bits: int = READ) -> None:
    """Raise Refused if `path` leads, through a link someone other than root made, out of
    the directories `within` (real paths: `roots`) to something others may not read (`bits`
    READ for a file, LIST for a directory) or in a directory others may not enter."""
    real = Path(os.path.realpath(path))
    if any(real == r or r in real.parents for r in within) or not _linked_by_others(path):
        return
    mode = _stat(real).st_mode
    if mode & bits != bits:
        raise Refused(f"is a link made by a user other than root to something others may not "
                      f"{'list' if bits == LIST else 'read'} (mode {stat.S_IMODE(mode):04o}), "
                      "which no model unit could read either")
    for parent in real.parents:
        if not _stat(parent).st_mode & stat.S_IXOTH:
            raise Refused("is a link made by a user other than root into a directory others "
                          "may not enter, which no model unit could read either")


def _linked_by_others(path: Path) -> bool:
    """Whether a component of `path` is a symbolic link owned by a user other than root."""
    for part in (path, *Path(os.path.abspath(path)).parents):
        try:
            st = os.lstat(part)
        except OSError:
            return True  # gone meanwhile: trust nothing
        if stat.S_ISLNK(st.st_mode) and st.st_uid != 0:
            return True
    return False


def regular_stat(path: Path) -> os.stat_result:
    """The stat of the regular file `path` leads to; raises Refused for anything else."""
    st = _stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise Refused(f"is {_kind(st.st_mode)}, not a regular file")
    return st


def open_regular(path: Path) -> tuple[int, os.stat_result]:
    """A descriptor of the regular file at `path` and its stat; raises Refused."""
    st = regular_stat(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        raise Refused(f"cannot be read ({e.strerror})") from None
    now = os.fstat(fd)
    if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise Refused("changed while it was being opened")
    return fd, now


def read_small(path: Path, limit: int) -> bytes:
    """At most `limit` bytes of a small regular file (a cache ref); raises Refused."""
    fd, _ = open_regular(path)
    try:
        return os.read(fd, limit)
    except OSError as e:
        raise Refused(f"cannot be read ({e.strerror})") from None
    finally:
        os.close(fd)
