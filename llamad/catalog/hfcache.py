"""Models downloaded by llama.cpp (`llama-server -hf user/repo:QUANT`), named as the router does.

llama.cpp stores downloads in the Hugging Face hub layout:
<cache>/models--<user>--<repo>/refs/main holds a commit, and
<cache>/models--<user>--<repo>/snapshots/<commit>/... holds the files (often links into blobs/).
Each first shard or single file with a quantization tag in its name is model `user/repo:TAG`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from llamad.catalog import files

_REPO = re.compile(r"[A-Za-z0-9_]+([/.-][A-Za-z0-9_]+)*")
_COMMIT = re.compile(r"[0-9a-fA-F]{40}")
_SPLIT = re.compile(r"(.+)-(\d{5})-of-(\d{5})$", re.IGNORECASE)
_TAG = re.compile(r"[-.]([A-Z0-9_]+)$", re.IGNORECASE)
_NOT_MODELS = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")

CachedModel = tuple[str, tuple[Path, ...], Path | None]  # id, shards, mmproj


def split_tag(rel: str) -> tuple[str, str, int, int]:
    """'dir/m-Q4_K_M-00001-of-00002.gguf' -> ('dir/m-Q4_K_M', 'Q4_K_M', 1, 2)."""
    prefix = rel.removesuffix(".gguf")
    index = count = 1
    if m := _SPLIT.fullmatch(prefix):
        prefix, index, count = m.group(1), int(m.group(2)), int(m.group(3))
    tag = m2.group(1).upper() if (m2 := _TAG.search(prefix)) else ""
    return prefix, tag, index, count


def _snapshot(repo_dir: Path, within: tuple[Path, ...], problems: list[str]) -> Path | None:
    """The snapshot `refs/main` (or another ref) names. A ref is read only if it is a small
    regular file (files.py: a FIFO would block), the snapshot listed only if llamad may."""
    refs = repo_dir / "refs"
    try:
        files.confine(refs, within, files.LIST)
        names = sorted(os.listdir(refs), key=lambda n: n != "main")
    except (OSError, files.Refused):
        return None
    for name in names:
        try:
            files.confine(refs / name, within)
            commit = files.read_small(refs / name, 128).decode("ascii", "replace").strip()
        except files.Refused as e:
            problems.append(f"{refs / name} {e}; skipped.")
            continue
        snapshot = repo_dir / "snapshots" / commit
        if not _COMMIT.fullmatch(commit) or not snapshot.is_dir():
            continue
        try:
            files.confine(snapshot, within, files.LIST)
        except files.Refused as e:
            problems.append(f"{snapshot} {e}; skipped.")
            continue
        return snapshot
    return None


def _files(snapshot: Path) -> list[str]:
    out = []
    for root, dirs, names in os.walk(snapshot):
        dirs.sort()
        rel = os.path.relpath(root, snapshot)
        out += sorted(os.path.normpath(os.path.join(rel, n)) for n in names if n.endswith(".gguf"))
    return out


def _bits(tag: str) -> int:
    m = re.search(r"\d+", tag)
    return int(m.group()) if m else 0


def _above(folder: str, model_dir: str) -> bool:
    """Whether `folder` is the model's or one above it, in whole path components (`a` is
    not above `ab`), as llama.cpp's find_best_sibling compares them."""
    return not folder or model_dir == folder or model_dir.startswith(folder + "/")


def _mmproj(files: list[str], model: str, tag: str) -> str | None:
    """The projector nearest to the model file, preferring one of the same quantization."""
    model_dir = os.path.dirname(model)
    best: tuple[int, bool, int] | None = None
    choice = None
    for f in files:
        if "mmproj" not in os.path.basename(f) or not _above(os.path.dirname(f), model_dir):
            continue
        rank = (-os.path.dirname(f).count("/") - bool(os.path.dirname(f)),
                f"-{tag}." not in f.upper(), abs(_bits(split_tag(f)[1]) - _bits(tag)))
        if best is None or rank < best:
            best, choice = rank, f
    return choice


def discover(root: Path, problems: list[str] | None = None) -> list[CachedModel]:
    """The cache's models; what cannot be read safely is told in `problems`."""
    out: list[CachedModel] = []
    problems = problems if problems is not None else []
    within = files.roots([root])
    try:
        repos = sorted(os.listdir(root))
    except OSError:
        return out
    for folder in repos:
        repo = folder.removeprefix("models--").replace("--", "/")
        if not folder.startswith("models--") or not _REPO.fullmatch(repo) or repo.count("/") != 1:
            continue
        snapshot = _snapshot(root / folder, within, problems)
        if snapshot is None:
            continue
        found = _files(snapshot)
        seen = set()
        for rel in found:
            prefix, tag, index, count = split_tag(rel)
            name = os.path.basename(rel)
            if index != 1 or not tag or any(k in name for k in _NOT_MODELS):
                continue
            if f"{repo}:{tag}" in seen:
                continue
            seen.add(f"{repo}:{tag}")
            shards = tuple(snapshot / (f"{prefix}-{n:05d}-of-{count:05d}.gguf" if count > 1
                                       else rel) for n in range(1, count + 1))
            mmproj = _mmproj(found, rel, tag)
            out.append((f"{repo}:{tag}", shards, snapshot / mmproj if mmproj else None))
    return out
