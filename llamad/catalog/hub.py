"""The Hugging Face hub as llama.cpp's `-hf` speaks it, and its cache layout on disk.

Pure and bounded: names, the hub's JSON (refs, tree) checked field by field, which files
a name means (llama.cpp's choice: the quantization asked for, else Q4_K_M, else Q8_0, else
the first model file; every shard of a split model; the nearest mmproj; or only a
repository's preset.ini), and the cache writes a download ends with. The HTTP side is
fetch.py's, which runs in its own systemd unit.

Cache layout (llama.cpp's, the Hugging Face hub's): <cache>/models--<user>--<repo>/
blobs/<oid> holds each file once, snapshots/<commit>/<path> links to it, refs/main names
the commit. A file is linked only once it is whole and verified, and the first shard of a
model (what makes the catalog list it) last.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamad import statefile
from llamad.catalog.hfcache import split_tag

DEFAULT_ENDPOINT = "https://huggingface.co/"
PARTIAL = ".downloadInProgress"  # llama.cpp's suffix: either program resumes the other's
_REPO = re.compile(r"[A-Za-z0-9_]+([/.-][A-Za-z0-9_]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_OID = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_SIDECARS = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")
# Prefixes Ollama clients put before a Hugging Face name (`ollama pull hf.co/user/repo`).
_OLLAMA_HOSTS = ("https://huggingface.co/", "https://hf.co/", "huggingface.co/", "hf.co/")
MAX_PATH = 512  # a repository file's path, in characters
MAX_FILES = 10000  # entries of a repository's tree


class HubError(Exception):
    """One sentence about a name or an answer of the hub; `permanent`: trying again
    cannot help (a missing repository, a corrupt file), else it may (the network)."""

    def __init__(self, message: str, permanent: bool = True) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class Name:
    """A model on the hub as llama.cpp's -hf names it: user/repo, with an optional :TAG."""

    repo: str
    tag: str = ""  # "": llama.cpp's default choice

    def __str__(self) -> str:
        return f"{self.repo}:{self.tag}" if self.tag else self.repo

    @property
    def folder(self) -> str:
        return "models--" + self.repo.replace("/", "--")


def parse_name(text: object) -> Name:
    """`user/repo[:QUANT]`, also as Ollama clients write it (`hf.co/user/repo:QUANT`,
    `:latest` for no quantization)."""
    if not isinstance(text, str) or not text:
        raise HubError('"model" must be a name such as user/repo:Q4_K_M')
    name = text.strip()
    for prefix in _OLLAMA_HOSTS:
        if name.lower().startswith(prefix):
            name = name[len(prefix):]
            break
    repo, _, tag = name.partition(":")
    if tag.lower() == "latest":
        tag = ""
    if len(repo) > 256 or repo.count("/") != 1 or not _REPO.fullmatch(repo):
        raise HubError(f"{text[:300]!r} is not a Hugging Face repository name "
                       "(user/repo, optionally :QUANT)")
    if tag and not _TAG.fullmatch(tag):
        raise HubError(f"{tag[:100]!r} is not a quantization tag (such as Q4_K_M)")
    return Name(repo, tag)


def endpoint(configured: str, env: dict[str, str] | os._Environ[str]) -> str:
    """The hub's address: llamad.conf's hf-endpoint, else $MODEL_ENDPOINT, else
    $HF_ENDPOINT (as llama.cpp reads them), else huggingface.co; ends with '/'."""
    url = configured or env.get("MODEL_ENDPOINT") or env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    return url if url.endswith("/") else url + "/"


@dataclass(frozen=True)
class RemoteFile:
    """A file of a repository at one commit, as the hub lists it."""

    path: str
    size: int
    oid: str  # SHA-256 (LFS) or the git blob's SHA-1 (a small file kept in git)

    @property
    def digest(self) -> str:
        return ("sha256:" if len(self.oid) == 64 else "sha1:") + self.oid


@dataclass(frozen=True)
class Plan:
    """What a download fetches: the files of one name at one commit."""

    name: Name
    commit: str
    files: tuple[RemoteFile, ...]  # the first shard (or preset.ini) first
    model: str  # the model id the cache will list: user/repo:TAG ("" for a preset)

    @property
    def preset(self) -> bool:
        return not self.model


def parse_refs(data: Any, repo: str) -> str:
    """The commit of branch main (else of the first branch) from api/models/REPO/refs."""
    branches = data.get("branches") if isinstance(data, dict) else None
    if not isinstance(branches, list):
        raise HubError(f"the hub's refs of {repo} are not in the expected form")
    found = [(b.get("name"), b.get("targetCommit")) for b in branches if isinstance(b, dict)]
    found = [(n, c) for n, c in found if isinstance(n, str) and isinstance(c, str)
             and _COMMIT.fullmatch(c)]
    if not found:
        raise HubError(f"the hub lists no branch of {repo}")
    return str(next((c for n, c in found if n == "main"), found[0][1]))


def parse_tree(data: Any, repo: str) -> list[RemoteFile]:
    """Files of api/models/REPO/tree/COMMIT?recursive=true; entries that are not plain
    files with a safe path, a size and a hash are left out."""
    if not isinstance(data, list):
        raise HubError(f"the hub's file list of {repo} is not in the expected form")
    out = []
    for item in data[:MAX_FILES]:
        if not isinstance(item, dict) or item.get("type") != "file":
            continue
        path, size, lfs = item.get("path"), item.get("size"), item.get("lfs")
        oid = lfs.get("oid") if isinstance(lfs, dict) else item.get("oid")
        if isinstance(lfs, dict) and isinstance(lfs.get("size"), int):
            size = lfs["size"]
        if (isinstance(path, str) and safe_path(path) and isinstance(size, int)
                and not isinstance(size, bool) and size >= 0
                and isinstance(oid, str) and _OID.fullmatch(oid)):
            out.append(RemoteFile(path, size, oid))
    return out


def safe_path(path: str) -> bool:
    """A relative path that stays inside the snapshot and reaches systemd intact."""
    return (0 < len(path) <= MAX_PATH and "\\" not in path and path.isprintable()
            and all(p not in ("", ".", "..") for p in path.split("/")))


def is_model_file(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return name.endswith(".gguf") and not any(k in name for k in _SIDECARS)


def choose(name: Name, commit: str, files: list[RemoteFile]) -> Plan:
    """The files `name` means, as llama.cpp's common_download_get_hf_plan picks them."""
    preset = next((f for f in files if f.path == "preset.ini"), None)
    if preset is not None:
        return Plan(name, commit, (preset,), "")
    primary = _best_model(files, name.tag)
    if primary is None:
        ggufs = sorted(f.path for f in files if f.path.endswith(".gguf"))[:20]
        what = f"no {name.tag} model file" if name.tag else "no model file"
        raise HubError(f"{name.repo} has {what}" + (
            f"; it has: {', '.join(ggufs)}" if ggufs else " (no .gguf files at all)"))
    tag = split_tag(primary.path)[1]
    if not tag:
        raise HubError(f"{name.repo}/{primary.path} has no quantization in its name (such as "
                       "-Q4_K_M.gguf), so llama.cpp's cache would never list it")
    shards = _shards(files, primary)
    mmproj = _best_mmproj(files, primary.path)
    return Plan(name, commit, (*shards, *([mmproj] if mmproj else [])),
                f"{name.repo}:{tag}")


# The quantizations a name without one means, in llama.cpp's order (common/download.cpp).
DEFAULT_TAGS = ("Q4_K_M", "Q8_0")


def _best_model(files: list[RemoteFile], tag: str) -> RemoteFile | None:
    def first_shard(f: RemoteFile) -> bool:
        _, _, index, count = split_tag(f.path)
        return is_model_file(f.path) and (count <= 1 or index == 1)
    for t in [tag] if tag else DEFAULT_TAGS:
        pattern = re.compile(re.escape(t) + "[.-]", re.IGNORECASE)
        hit = next((f for f in files if first_shard(f) and pattern.search(f.path)), None)
        if hit is not None:
            return hit
    return None if tag else next((f for f in files if first_shard(f)), None)


def _shards(files: list[RemoteFile], primary: RemoteFile) -> list[RemoteFile]:
    prefix, _, _, count = split_tag(primary.path)
    if count <= 1:
        return [primary]
    found = {split_tag(f.path)[2]: f for f in files
             if split_tag(f.path)[3] == count and split_tag(f.path)[0] == prefix}
    missing = [n for n in range(1, count + 1) if n not in found]
    if missing:
        raise HubError(f"{primary.path} is split in {count} files, but the hub lacks part "
                       f"{missing[0]}")
    return [found[n] for n in range(1, count + 1)]


def _bits(tag: str) -> int:
    m = re.search(r"\d+", tag)
    return int(m.group()) if m else 0


def _best_mmproj(files: list[RemoteFile], model: str) -> RemoteFile | None:
    """The projector in the model's folder or the nearest one above it, closest in bits."""
    model_dir = model.rsplit("/", 1)[0] if "/" in model else ""
    want = _bits(split_tag(model)[1])
    best: tuple[int, int] | None = None
    choice = None
    for f in files:
        if not f.path.endswith(".gguf") or "mmproj" not in f.path:
            continue
        folder = f.path.rsplit("/", 1)[0] if "/" in f.path else ""
        if folder and not (model_dir == folder or model_dir.startswith(folder + "/")):
            continue
        rank = (-(folder.count("/") + 1 if folder else 0),
                abs(_bits(split_tag(f.path)[1]) - want))
        if best is None or rank < best:
            best, choice = rank, f
    return choice


# -- the cache on disk -------------------------------------------------------------------

def blob(cache: Path, name: Name, oid: str) -> Path:
    return cache / name.folder / "blobs" / oid


def snapshot(cache: Path, name: Name, commit: str) -> Path:
    return cache / name.folder / "snapshots" / commit


def publish(cache: Path, plan: Plan) -> Path:
    """Link every (verified) blob into the plan's snapshot, the first file last, then
    point refs/main at it. Returns the first file's path in the snapshot."""
    snap = snapshot(cache, plan.name, plan.commit)
    for f in reversed(plan.files):
        target = snap / f.path
        target.parent.mkdir(parents=True, exist_ok=True)
        link = os.path.relpath(blob(cache, plan.name, f.oid), target.parent)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.link")
        tmp.unlink(missing_ok=True)
        os.symlink(link, tmp)
        os.replace(tmp, target)
    refs = cache / plan.name.folder / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    old = current_commit(cache, plan.name)
    if old != plan.commit:
        if old:
            _carry_over(snapshot(cache, plan.name, old), snap)
        statefile.replace(refs / "main", plan.commit)
    return snap / plan.files[0].path


def current_commit(cache: Path, name: Name) -> str:
    try:
        commit = (cache / name.folder / "refs" / "main").read_text(errors="replace").strip()
    except OSError:
        return ""
    return commit if _COMMIT.fullmatch(commit) else ""


def _carry_over(old: Path, new: Path) -> None:
    """Links of the snapshot refs/main named before into the new one, where it has no file
    of that path: the cache lists only refs/main's snapshot, and a newer commit of the
    repository must not hide the quantizations downloaded from an older one."""
    for root, _dirs, names in os.walk(old):
        for n in names:
            src = Path(root) / n
            dest = new / src.relative_to(old)
            if src.is_symlink() and not os.path.lexists(dest):
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(os.readlink(src), dest)


def remove(cache: Path, name: Name) -> int:
    """llama.cpp's common_download_remove: without a tag the repository's whole folder,
    with one the snapshot's files of that tag and the blobs no other file links to (an
    unfinished download stays, for a later one to resume). Returns the files removed."""
    folder = cache / name.folder
    if not folder.is_dir():
        return 0
    if not name.tag:
        count = sum(len(files) for _, _, files in os.walk(folder))
        shutil.rmtree(folder)
        return count
    commit = current_commit(cache, name)
    snap = snapshot(cache, name, commit) if commit else None
    gone = [p for p in _links(snap) if split_tag(p.name)[1] == name.tag.upper()] \
        if snap is not None else []
    blobs = {_blob_of(p, folder) for p in gone} - {None}
    for p in gone:
        p.unlink()
    kept = {_blob_of(p, folder) for p in _links(snap)} if snap is not None else set()
    count = len(gone)
    for b in blobs - kept:
        assert b is not None
        b.unlink(missing_ok=True)
    return count


def _links(snap: Path | None) -> list[Path]:
    if snap is None or not snap.is_dir():
        return []
    return [Path(root) / n for root, _d, names in os.walk(snap) for n in names]


def _blob_of(link: Path, folder: Path) -> Path | None:
    """The blob a snapshot entry links to, if it is one of this repository's."""
    if not link.is_symlink():
        return None
    target = Path(os.path.normpath(link.parent / os.readlink(link)))
    return target if target.parent == folder / "blobs" else None
