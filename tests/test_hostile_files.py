"""What a member of group `llamad` may leave in the models directory or the llama.cpp cache
cannot stop, slow or fool the catalog (docs/security.md, "Hostile model files"): files that
are no regular files, header bombs, names that look like flags or like root's aliases, and
links to what only root may read. tests/integration/test_hostile_models.py tries them on a
llamad in the box."""

from __future__ import annotations

import os
import socket
import time
import tracemalloc
from pathlib import Path

import pytest
import rig
from helpers import ggufgen

from llamad.catalog import catalog, discover, ggufheader
from llamad.catalog.catalog import Snapshot, may_appear, scan
from llamad.catalog.gguf_info import GGUFError, InfoCache, metadata, read_header
from llamad.catalog.presets import parse_presets
from llamad.config import Config

MIB = 1024 * 1024


def config(*dirs: Path, cache: Path | None = None) -> Config:
    return Config.default(models_dirs=dirs, llama_cache_dir=cache, llama_cache=cache is not None,
                          models_preset=None)


def aged(*paths: Path) -> None:
    then = time.time() - 60
    for p in paths:
        os.utime(p, (then, then), follow_symlinks=False)


def about(snap: Snapshot, word: str) -> list[str]:
    return [p for p in snap.problems if word in p]


def test_files_that_are_no_regular_files_are_refused_without_blocking(
        tmp_path: Path) -> None:
    """A FIFO as shard 2 once held the scan for ever, and with it llamad's start (M4)."""
    d = tmp_path / "models"
    ggufgen.write_model(d / "good.gguf")
    ggufgen.write_model(d / "evil-00001-of-00002.gguf", split=(1, 2))
    os.mkfifo(d / "evil-00002-of-00002.gguf")
    os.mkfifo(d / "fifo.gguf")
    os.symlink("/dev/zero", d / "device.gguf")
    os.symlink(d / "gone.gguf", d / "dangling.gguf")
    os.symlink(d / "loop.gguf", d / "loop.gguf")
    (d / "Sub").mkdir()
    ggufgen.write_model(d / "Sub" / "model.gguf")
    os.mkfifo(d / "Sub" / "mmproj-sub.gguf")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(d / "sock.gguf"))
        aged(*d.rglob("*"))
        start = time.monotonic()
        snap = scan(config(d), cache=InfoCache())
        assert time.monotonic() - start < 5
    assert sorted(snap.models) == ["good"]
    said = {"evil-00002-of-00002.gguf": "is a FIFO, not a regular file",
            "fifo.gguf": "is a FIFO", "device.gguf": "is a character device",
            "dangling.gguf": "is a broken symbolic link", "loop.gguf": "is a symbolic link loop",
            "mmproj-sub.gguf": "is a FIFO", "sock.gguf": "is a socket"}
    for name, words in said.items():
        lines = about(snap, name)
        assert len(lines) == 1 and words in lines[0], (name, snap.problems)


def test_header_bombs_cost_little_and_say_why(tmp_path: Path) -> None:
    """Each bomb is refused in milliseconds, allocating next to nothing (M5, L6)."""
    d = tmp_path / "models"
    d.mkdir()
    said = ggufgen.write_bombs(d)
    ggufgen.write_model(d / "good.gguf")
    aged(*d.iterdir())
    tracemalloc.start()
    start = time.thread_time()
    snap = scan(config(d), cache=InfoCache())
    cpu = time.thread_time() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert sorted(snap.models) == ["good"]
    for name, words in said.items():
        lines = about(snap, name)
        assert len(lines) == 1 and words in lines[0], (name, snap.problems)
    assert cpu < 2 and peak < 8 * MIB, (cpu, peak)


def test_reading_has_a_budget_per_file_and_per_scan(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Strings are stepped over up to MAX_STRINGS per file; what one scan cannot read within
    SCAN_SECONDS waits, like a file being written, for the next scan."""
    d = tmp_path / "models"
    d.mkdir()
    n = ggufheader.MAX_STRINGS + 1
    with open(d / "many.gguf", "wb") as f:
        ggufgen.write_strings(f, n)
    with pytest.raises(GGUFError, match=f"more than {ggufheader.MAX_STRINGS} strings"):
        read_header(d / "many.gguf")
    ggufgen.write_model(d / "a.gguf")
    ggufgen.write_model(d / "b.gguf")
    aged(*d.iterdir())
    monkeypatch.setattr(discover, "SCAN_SECONDS", 0.0)  # every header read spends it
    cache = InfoCache()
    snaps = [scan(config(d), cache=cache)]
    while snaps[-1].pending and len(snaps) < 5:  # each scan reads one header at least
        snaps.append(scan(config(d), cache=cache, previous=snaps[-1]))
    assert [sorted(s.models) for s in snaps] == [["a"], ["a", "b"], ["a", "b"]]
    assert len(about(snaps[0], "is not read yet")) == 2 and snaps[1].settling == {"many"}
    assert not snaps[2].pending and len(about(snaps[2], "many.gguf")) == 1


def test_names_are_never_flags(tmp_path: Path) -> None:
    """A model id or alias starting with '-' is refused with one problem line naming the
    file (M1); a request for such a name never rescans."""
    d = tmp_path / "models"
    ggufgen.write_model(d / "--rpc=127.0.0.1:8080.gguf")
    ggufgen.write_model(d / "-c=16" / "model.gguf")
    ggufgen.write_model(d / "plain.gguf")
    aged(*d.rglob("*"))
    preset = tmp_path / "presets.ini"
    preset.write_text("[plain]\nalias = -ngl,p\n")
    snap = scan(config(d), preset=parse_presets(preset.read_text(), preset))
    assert sorted(snap.models) == ["plain"] and dict(snap.aliases) == {"p": "plain"}
    for name in ("--rpc=127.0.0.1:8080.gguf", "-c=16", "alias '-ngl'"):
        lines = about(snap, name)
        assert len(lines) == 1 and "starts with '-'" in lines[0], snap.problems
    assert str(preset) in about(snap, "alias '-ngl'")[0]
    assert not may_appear(config(d), "--rpc=127.0.0.1:8080")


def test_root_configured_names_win_over_file_names(tmp_path: Path) -> None:
    """A file named like a preset alias does not capture it, nor the keys scoped to it (L2)."""
    d = tmp_path / "models"
    ggufgen.write_model(d / "real.gguf")
    ggufgen.write_model(d / "chat.gguf")  # dropped by a group member
    aged(*d.iterdir())
    preset = parse_presets("[real]\nalias = chat\n")
    snap = scan(config(d), preset=preset)
    assert sorted(snap.models) == ["real"]
    resolved = snap.resolve("chat")
    assert resolved is not None and resolved.id == "real"
    assert len(about(snap, "alias of preset [real]")) == 1


def _not_roots(link: Path) -> None:
    """The link made by someone other than root, whoever runs the test."""
    if os.geteuid() == 0:
        os.lchown(link, 65534, 65534)


def test_links_lead_only_where_a_model_unit_could_read(tmp_path: Path) -> None:
    """Links someone other than root made, out of the models directory, to what others may
    not read are refused, and neither the file's bytes nor a directory's names are told
    (L3); links root made, and links within the directory, are followed."""
    d = tmp_path / "models"
    d.mkdir(mode=0o755)
    secret = tmp_path / "secret"
    secret.mkdir(mode=0o700)
    (secret / "shadow").write_bytes(b"root:$6$topsecret$hash\n")
    ggufgen.write_model(secret / "Hidden" / "private-name.gguf")
    links = {"shadow.gguf": secret / "shadow", "Hidden": secret / "Hidden"}
    for name, target in links.items():
        os.symlink(target, d / name)
        _not_roots(d / name)
    ggufgen.write_model(d / "inside.gguf")
    os.symlink(d / "inside.gguf", d / "alias-inside.gguf")
    _not_roots(d / "alias-inside.gguf")
    aged(*d.rglob("*"), *secret.rglob("*"))
    snap = scan(config(d), cache=InfoCache())
    assert sorted(snap.models) == ["alias-inside", "inside"]
    for name in links:
        lines = about(snap, f"{d / name} is a link made by a user other than root")
        assert len(lines) == 1, snap.problems
    text = "\n".join(snap.problems)
    assert "topsecret" not in text and "root:" not in text and "private-name" not in text


def test_a_scan_keeps_a_bounded_number_of_models_and_problems(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Links by the hundred thousand to one tiny file cannot make llamad's memory grow
    without bound: at most MAX_MODELS models and MAX_PROBLEMS problem lines are kept."""
    d = tmp_path / "models"
    one = ggufgen.write_model(d / "m0.gguf")
    for n in range(1, 5):
        os.link(one, d / f"m{n}.gguf")
        (d / f"bad{n}.gguf").write_bytes(b"junk")
    aged(*d.iterdir())
    monkeypatch.setattr(catalog, "MAX_MODELS", 3)
    monkeypatch.setattr(catalog, "MAX_PROBLEMS", 2)
    snap = scan(config(d), cache=InfoCache())
    assert sorted(snap.models) == ["m0", "m1", "m2"]
    assert len(snap.problems) == 3 and snap.problems[-1] == "... and 3 more problems."
    monkeypatch.setattr(catalog, "MAX_PROBLEMS", 10)
    said = scan(config(d), cache=InfoCache()).problems
    assert "more than 3 models were found; the other 2 are left out." in said


def test_a_cache_ref_that_is_no_regular_file_is_refused_without_blocking(
        tmp_path: Path) -> None:
    """llama.cpp's cache: a FIFO as `refs/main` once held the scan like a FIFO shard (M4);
    a snapshot linked into a directory others may not list is not listed (L3)."""
    hub = tmp_path / "hub"
    good = hub / "models--u--good" / "snapshots" / ("a" * 40)
    ggufgen.write_model(good / "good-Q4_K_M.gguf")
    (hub / "models--u--good" / "refs").mkdir()
    (hub / "models--u--good" / "refs" / "main").write_text("a" * 40)
    (hub / "models--u--fifo" / "refs").mkdir(parents=True)
    os.mkfifo(hub / "models--u--fifo" / "refs" / "main")
    secret = tmp_path / "secret"
    secret.mkdir(mode=0o700)
    ggufgen.write_model(secret / "private-Q8_0.gguf")
    (hub / "models--u--link" / "refs").mkdir(parents=True)
    (hub / "models--u--link" / "refs" / "main").write_text("b" * 40)
    (hub / "models--u--link" / "snapshots").mkdir()
    os.symlink(secret, hub / "models--u--link" / "snapshots" / ("b" * 40))
    _not_roots(hub / "models--u--link" / "snapshots" / ("b" * 40))
    aged(*hub.rglob("*"), *secret.rglob("*"))
    start = time.monotonic()
    snap = scan(config(cache=hub), cache=InfoCache())
    assert time.monotonic() - start < 5
    assert sorted(snap.models) == ["u/good:Q4_K_M"]
    assert len(about(snap, "refs/main is a FIFO, not a regular file")) == 1, snap.problems
    assert len(about(snap, "is a link made by a user other than root")) == 1, snap.problems
    assert "private" not in "\n".join(snap.problems)


def test_the_whole_header_is_shown_within_bounds(tmp_path: Path) -> None:
    """Ollama's /api/show lists every key (gguf_info.metadata): the same bounds hold."""
    d = tmp_path / "models"
    d.mkdir()
    ggufgen.write_bombs(d)
    for name in ("tensors.gguf", "strings.gguf", "nested.gguf"):
        with pytest.raises(GGUFError):
            metadata(d / name)
    assert metadata(d / "negative.gguf")["llama.context_length"] == -2**62  # only shown
    shown = metadata(rig.GEMMA)
    assert shown["general.architecture"] == "gemma3" and shown["tokenizer.ggml.tokens"] is None
