"""Weights llama.cpp's CPU backend copies ("repacks") on x86 with AVX2.

Where the CPU holds a matrix of type Q4_0, Q4_K, IQ4_NL or MXFP4 (rows a multiple of 8),
llama.cpp copies it, interleaved for its AVX2 kernels, into a buffer of its own
(CPU_REPACK): anonymous memory as large as the matrices, beside the mapped file, whose
pages loading reads all the same. A generated Q4_0 model of a 235 MiB file peaked at 540
MiB where 360 without the copy (-nr); the estimate said 404. Reading the file into memory
instead (-lm none, mlock, dio) puts the matrices in that buffer rather than in one more:
no copy. Nor with a CUDA device: the host's layers go to its pinned host buffer type, which
comes first (and, mapped, to the plain CPU one), unless --no-host; the GPU's layers stay
where they are. The pinned llama-server is built for AVX2 without AVX-512 (its
system_info), so Q2_K, which needs AVX-512, is not repacked; on ARM llama.cpp repacks
other types, which llamad does not count (yet).
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

from llamad.catalog.tensortable import TensorBytes
from llamad.memory.serverargs import ServerArgs

X86 = frozenset(("x86_64", "amd64", "i386", "i686"))
CPUINFO = Path("/proc/cpuinfo")


def on(machine: str, cpuinfo: str) -> bool:
    """Whether llama.cpp repacks on a CPU of this architecture (platform.machine()) and
    /proc/cpuinfo: x86 with AVX2."""
    if machine.lower() not in X86:
        return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):  # the first CPU's: the others have the same
            return "avx2" in line.partition(":")[2].split()
    return False


@functools.cache
def here() -> bool:
    """Whether llama.cpp repacks on this machine, where llamad runs its models: read once."""
    try:
        with CPUINFO.open() as f:
            # The first CPU's lines, not every core's (1.5 KB each on a 200-core server).
            head = "".join(line for line, _ in zip(f, range(64), strict=False))
    except OSError:
        return False
    return on(platform.machine(), head)


def copies(s: ServerArgs, *, cpu: bool, gpu: bool) -> bool:
    """Whether llama-server copies the host's matrices with these arguments: `cpu`, this
    machine's CPU repacks (here()); `gpu`, llama-server has a CUDA device."""
    return cpu and s.repack and (not gpu or s.no_host) and s.maps_file


def host_bytes(table: TensorBytes, layers: float, head: bool) -> int:
    """Bytes of the copies of the matrices the host holds: `layers`, its share of the
    repeating layers' bytes (their matrices counted in proportion: the table keeps sums);
    `head`, whether it holds the head."""
    return int(table.repack * layers) + (table.repack_head if head else 0)
