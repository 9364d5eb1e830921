"""Write small, real GGUF files with the gguf package, for tests and benchmarks."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import gguf
import numpy as np

GEMMA = Path(os.environ.get("LLAMAD_CACHE", Path.home() / ".cache/llamad-ci")) / \
    "models/gemma3-270m-q4_k_m.gguf"


def write_model(path: Path, *, arch: str = "llama", context: int = 4096, blocks: int = 2,
                heads: int = 4, heads_kv: int = 2, embd: int = 64, rows: int = 8,
                file_type: int | None = int(gguf.LlamaFileType.ALL_F32),
                extra: dict[str, int | str | bool] | None = None,
                split: tuple[int, int] | None = None) -> Path:
    """A tiny model: `blocks` F32 weight matrices of rows x embd plus a vocabulary.

    split=(n, count) writes shard n (1-based) of a count-file split set.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    if split is None or split[0] == 1:
        w.add_context_length(context)
        w.add_block_count(blocks)
        w.add_head_count(heads)
        w.add_head_count_kv(heads_kv)
        w.add_embedding_length(embd)
        if file_type is not None:
            w.add_file_type(file_type)
        w.add_token_list([f"tok{i}" for i in range(32)])
    if split is not None:
        w.add_uint16("split.no", split[0] - 1)
        w.add_uint16("split.count", split[1])
        w.add_int32("split.tensors.count", blocks * split[1])
    for key, value in (extra or {}).items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_string(key, value)
    shard = 0 if split is None else split[0] - 1
    for i in range(blocks):
        data = np.full((rows, embd), float(i), dtype=np.float32)
        w.add_tensor(f"blk.{shard * blocks + i}.attn_q.weight", data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_split(directory: Path, stem: str, count: int, **kw: object) -> list[Path]:
    """A split set named like llama.cpp's gguf-split output: stem-0000N-of-0000M.gguf."""
    return [write_model(directory / f"{stem}-{n:05d}-of-{count:05d}.gguf", split=(n, count),
                        **kw)  # type: ignore[arg-type]
            for n in range(1, count + 1)]


def write_mmproj(path: Path, *, vision: bool = True, audio: bool = False) -> Path:
    return write_model(path, arch="clip", file_type=None,
                       extra={"clip.has_vision_encoder": vision, "clip.has_audio_encoder": audio})


def truncate(path: Path, keep: int) -> Path:
    """Cut a file down to its first `keep` bytes (a download that stopped)."""
    with open(path, "r+b") as f:
        f.truncate(keep)
    return path


def copy_slowly(src: Path, dst: Path, chunks: int, pause: float) -> None:
    """Copy in `chunks` writes with pauses between them, like a slow network copy."""
    import time

    data = src.read_bytes()
    step = max(1, len(data) // chunks)
    with open(dst, "wb") as f:
        for start in range(0, len(data), step):
            f.write(data[start:start + step])
            f.flush()
            time.sleep(pause)


def copy_file(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst
