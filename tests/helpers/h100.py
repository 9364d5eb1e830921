"""What the Gemma model needs on an H100, as measured there: the figures the estimate and
the learning are held to without a GPU here."""

from __future__ import annotations

import functools

import rig

from llamad.catalog.gguf_info import GGUFInfo, combine, read_header

MIB = 1024**2

# Measured on an NVIDIA H100 80GB HBM3 (driver 580, CUDA 13.0) with a CUDA build of the pinned
# llama-server and this Gemma model (docs/benchmarks.md, "GPU"): NVML's figure for the
# process, and llama.cpp's own CUDA0 buffers (model / KV / compute), MiB.
H100 = [
    ("-ngl 99 -c 1024", 862, 235.2, 18.0, 19.0),
    ("-ngl 99 -c 8192", 912, 235.2, 61.5, 27.5),
    ("-ngl 99 -c 32768 -np 4", 1006, 235.2, 156.0, 26.0),
    ("-ngl 99", 1008, 235.2, 133.5, 51.5),
    ("-ngl 99 -c 8192 -np 1", 890, 235.2, 39.0, 26.0),
    ("-ngl 99 -c 8192 -ctk q8_0 -ctv q8_0", 886, 235.2, 32.7, 28.1),
    ("-ngl 10 -c 8192", 852, 202.8, 33.5, 27.5),
]
H100_NAME = "NVIDIA H100 80GB HBM3"
# The unit's cgroup at -ngl 99 -c 8192 after three completions: memory.current, and of it
# anonymous + shared memory (the rest is page cache: the model file, the CUDA libraries).
H100_RAM, H100_ANON = 794.5 * MIB, (203.7 + 29.5) * MIB


@functools.cache
def gemma_info() -> GGUFInfo:
    return combine([read_header(rig.GEMMA)], None)
