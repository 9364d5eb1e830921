"""llamad's own memory: what glibc's allocator keeps after a burst is given back.

A start parses the catalog (every model's header, or the cached ones) and a GET /v1/models
of thousands of models encodes megabytes; both free most of it again, but glibc keeps
freed heap memory for reuse, and raises its threshold for returning big blocks straight to
the system each time it frees one. Idle, llamad then holds megabytes it no longer uses.
`setup()` pins that threshold (big blocks are always mapped on their own and unmapped when
freed); `trim()` hands the free top and free pages of the heap back after a burst. Both are
no-ops where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("llamad.heap")

M_MMAP_THRESHOLD = -3  # mallopt parameters, glibc's malloc.h
MMAP_THRESHOLD = 256 * 1024  # glibc's starting value is 128 KiB; it then only grows


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: the C library's among them
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


_LIBC = _libc()


def setup() -> None:
    if _LIBC is not None and not _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        log.debug("mallopt(M_MMAP_THRESHOLD) refused")


def trim() -> None:
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
