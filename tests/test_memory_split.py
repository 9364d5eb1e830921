"""Compute buffers of a model spread over several devices (memory/pipeline.py): local GPUs
(estimate, n_gpus) and llama.cpp RPC workers (estimate_rpc), the latter against the real
llama-server over two and three real ggml-rpc-server workers on loopback."""

from __future__ import annotations

import contextlib
import functools
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import rig
from helpers import ggufgen, llamaserver
from helpers.ports import free_port

from llamad.catalog import gguf_info
from llamad.catalog.gguf_info import TensorBytes
from llamad.memory import estimate as memory

MIB = 1024**2


class Llama2k(NamedTuple):
    """ggufgen.write_llama(embd=2048, ff=8192, heads=16, heads_kv=4, head_dim=128, blocks=4,
    vocab=8192): the model of the measurements below, as far as the estimate reads it."""

    architecture: str = "llama"
    block_count: int = 4
    context_length: int = 32768
    head_count: int = 16
    head_count_kv: int = 4
    embedding_length: int = 2048
    key_length: int = 128
    value_length: int = 128
    size: int = 555149760
    feed_forward_length: int = 8192
    tensors: TensorBytes = TensorBytes((116 * MIB,) * 4, 32 * MIB, 32 * MIB, False, 8192)


# llama-server's compute buffers for Llama2k at -c 32768 over two RPC workers (MiB: the
# first device's, the second's, the host's), pipeline parallelism on; one worker: 96,
# 384 and 1110 MiB. A local multi-GPU split runs the same scheduler, so the same copies.
TWO_DEVICES = [
    ("-c 32768 -fa on", 240.05, 156.04, 168.07),
    ("-c 32768 -fa on -ub 2048", 960.22, 624.16, 672.28),
    ("-c 32768 -fa off", 1356.04, 1316.02, 304.05),
]


def test_gpus_of_a_split_hold_the_pipelines_copies(subtests: Any) -> None:
    info = Llama2k()
    for args, first, second, host in TWO_DEVICES:
        with subtests.test(args):
            est = memory.estimate(info, args.split(), gpu=True, n_gpus=2)
            real = (first + second) * MIB
            assert real <= est.compute.vram <= 1.35 * real
            host_est = est.compute.ram - 4 * 8192 * 4  # less the logits, a row per slot
            assert host * MIB <= host_est <= 1.2 * host * MIB
            one = memory.estimate(info, args.split(), gpu=True)
            assert one.compute == memory.estimate(info, args.split(), gpu=True, n_gpus=1).compute


def test_when_llama_cpp_runs_a_pipeline(subtests: Any) -> None:
    """llama-context.cpp: more than one device, every layer and the output offloaded, layer
    split mode, the KV cache offloaded, no tensor override. Otherwise each device holds a
    graph's working set of its own, and no copies."""
    info = Llama2k()
    base = ["-c", "32768"]
    graph = memory.estimate(info, base, gpu=True).compute.vram
    on = memory.estimate(info, base, gpu=True, n_gpus=2).compute.vram
    assert on > 2 * graph
    assert memory.estimate(info, [*base, "-ngl", "99", "-sm", "layer"], gpu=True,
                           n_gpus=2).compute.vram == on
    off = {
        "a layer left on the host": ["-ngl", "4"],
        "row split": ["-sm", "row"],
        "KV cache on the host": ["-nkvo"],
        "a tensor override": ["-ot", r"blk\.0\.ffn_up=CUDA0"],
        "experts kept on the host": ["--n-cpu-moe", "1"],
    }
    for name, extra in off.items():
        with subtests.test(name):
            est = memory.estimate(info, [*base, *extra], gpu=True, n_gpus=2)
            assert est.compute.vram == 2 * memory.estimate(
                info, [*base, *extra], gpu=True).compute.vram
    three = memory.estimate(info, base, gpu=True, n_gpus=3).compute.vram
    assert three == on * 3 // 2


# -- against llama-server over real RPC workers ---------------------------------------------


@contextlib.contextmanager
def rpc_workers(n: int) -> Iterator[list[str]]:
    """`n` ggml-rpc-server processes on loopback, each one CPU device; their addresses."""
    procs, addresses = [], []
    try:
        for _ in range(n):
            port = free_port()
            procs.append(subprocess.Popen([str(rig.RPC_SERVER), "-H", "127.0.0.1", "-p",
                                           str(port)], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
            addresses.append(f"127.0.0.1:{port}")
        for address in addresses:
            rig.wait_for(f"the rpc worker on {address}", functools.partial(_answers, address),
                         timeout=30, interval=0.1)
        yield addresses
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)


def _answers(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def buffers(model: Path, args: list[str]) -> tuple[bool, list[float], float]:
    """(pipeline parallelism on, the workers' compute buffers, the host's; MiB), as
    llama-server logs them once its context is made (it is stopped then)."""
    with llamaserver.started("-t", "2", "-lv", "4", *args, model=model) as server:
        rig.wait_for("llama-server to reserve its graph", lambda: "sched_reserve: graph"
                     in server.logged() or server.proc.poll() is not None, timeout=120,
                     interval=0.2)
    text = server.log
    found = re.findall(r"sched_reserve: +(\S+) compute buffer size = +([\d.]+) MiB", text)
    workers = [float(size) for name, size in found if name.startswith("RPC")]
    host = [float(size) for name, size in found if name == "CPU"]
    assert workers and host, text[-2000:]
    return "pipeline parallelism enabled" in text, workers, host[-1]


def test_rpc_workers_against_real_llama_server(tmp_path: Path, subtests: Any) -> None:
    path = ggufgen.write_llama(tmp_path / "m.gguf", embd=1024, ff=4096, heads=16, heads_kv=4,
                               head_dim=64, blocks=8, vocab=4096)
    info = gguf_info.combine([gguf_info.read_header(path)], None)
    table = [
        (2, ["-c", "8192", "-fa", "on"]),
        (2, ["-c", "8192", "-fa", "off"]),
        (2, ["-c", "8192", "-fa", "on", "-np", "2"]),
        (2, ["-c", "16384", "-fa", "on", "-ub", "1024"]),
        (3, ["-c", "8192", "-fa", "on"]),
        (2, ["-c", "8192", "-fa", "on", "-ngl", "8"]),  # a layer on the host: no pipeline
    ]
    for n, args in table:
        with subtests.test(workers=n, args=" ".join(args)), rpc_workers(n) as addresses:
            full = [*args, "--rpc", ",".join(addresses)]
            pipeline, workers, host = buffers(path, full)
            est = memory.estimate_rpc(info, full)
            one = memory.estimate_rpc(info, [*args, "--rpc", addresses[0]])
            host_est = est.compute.ram - (memory.parse_args(args).parallel or 4) * 4096 * 4
            print(f"\n{n} workers {' '.join(args)}: pipeline {pipeline}; workers "
                  f"{' + '.join(map(str, workers))} MiB, estimate {est.compute.vram / MIB:.1f};"
                  f" host {host} MiB, estimate {host_est / MIB:.1f}")
            assert pipeline == ("-ngl" not in args)
            assert sum(workers) * MIB <= est.compute.vram <= 1.35 * sum(workers) * MIB
            if pipeline:
                assert host * MIB <= host_est <= 1.35 * host * MIB
            assert one.compute.vram < est.compute.vram  # each worker holds a working set
    path.unlink()
