"""Discovery on real directories: names, split sets, projectors, cache, presets, problems."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import rig
from helpers import ggufgen
from helpers.catalogs import age, config, problems_about

from llamad.catalog.catalog import Catalog, scan
from llamad.catalog.discover import split_info
from llamad.catalog.gguf_info import InfoCache
from llamad.catalog.presets import parse_presets
from llamad.config import Config

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(root: Path, repo: str, files: dict[str, str]) -> Path:
    """An HF-hub style cache entry; files maps relative name -> kind (model|mmproj)."""
    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT + "\n")
    snap = folder / "snapshots" / COMMIT
    for rel, kind in files.items():
        if kind == "mmproj":
            ggufgen.write_mmproj(snap / rel)
        else:
            ggufgen.write_model(snap / rel)
    return snap


def test_models_dir_naming(tmp_path: Path) -> None:
    d = tmp_path / "models"
    ggufgen.write_model(d / "Alpha.gguf")
    ggufgen.write_model(d / "alpha.gguf")
    shards = ggufgen.write_split(d / "Big", "big-Q4_K_M", 3)
    proj = ggufgen.write_mmproj(d / "Big" / "mmproj-big-F16.gguf")
    ggufgen.write_model(d / "Solo" / "whatever-name.gguf")
    ggufgen.write_mmproj(d / "mmproj-top.gguf")  # a projector alone is not a model
    ggufgen.write_model(d / "Deep" / "nested" / "x.gguf")  # router looks one level down
    age(d)
    snap = scan(config(d))
    assert sorted(snap.models) == ["Alpha", "Big", "Solo", "alpha"]  # case-sensitive
    big = snap.models["Big"]
    assert big.path == shards[0] and big.shards == tuple(shards) and big.mmproj == proj
    assert big.info is not None and big.info.modalities == ("text", "image")
    assert big.info.size == sum(p.stat().st_size for p in shards)
    assert big.source == "models_dir" and big.unit == "llama-server@Big.service"
    assert big.settings.args[:4] == ("--model", str(shards[0]), "--mmproj", str(proj))
    assert snap.models["Solo"].path.name == "whatever-name.gguf"
    assert snap.models["Alpha"].created == int(d.joinpath("Alpha.gguf").stat().st_mtime)


def test_top_level_names_drop_every_gguf_as_the_router_does(tmp_path: Path) -> None:
    # llama-server's router removes every ".gguf" from a top-level file's name, not only the
    # suffix: clients send the ids it lists, so `a.gguf.gguf` must be `a` here too.
    d = tmp_path / "models"
    ggufgen.write_model(d / "a.gguf.gguf")
    ggufgen.write_model(d / "x.gguf-y.gguf")
    ggufgen.write_model(d / "f.gguf" / "inner.gguf")  # a directory keeps its name whole
    ggufgen.write_model(d / ".gguf.gguf")  # no name at all: a problem, not a model ""
    age(d)
    snap = scan(config(d))
    assert sorted(snap.models) == ["a", "f.gguf", "x-y"]
    assert any(".gguf.gguf has no name left" in p for p in snap.problems), snap.problems


def test_gemma_is_discovered(tmp_path: Path) -> None:
    d = tmp_path / "models"
    d.mkdir()
    os.symlink(rig.GEMMA, d / "gemma3-270m.gguf")
    snap = scan(config(d))
    info = snap.models["gemma3-270m"].info
    assert info is not None and info.architecture == "gemma3"
    assert info.parameters and info.parameters > 200_000_000


def test_unservable_files_are_skipped_with_one_problem_each(tmp_path: Path) -> None:
    d = tmp_path / "models"
    ggufgen.write_model(d / "good.gguf")
    (d / "readme.txt").write_text("not a model")
    (d / "fake.gguf").write_bytes(b"definitely not gguf" * 20)
    ggufgen.truncate(ggufgen.write_model(d / "cut.gguf"), 3000)
    os.symlink(d / "gone.gguf", d / "dangling.gguf")
    ggufgen.write_split(d / "Partial", "p", 3)[1].unlink()
    locked = ggufgen.write_model(d / "locked.gguf")
    age(d)
    locked.chmod(0)
    try:
        snap = scan(config(d), cache=InfoCache())
    finally:
        locked.chmod(0o644)
    expected = ["good"] + (["locked"] if os.geteuid() == 0 else [])  # root reads anything
    assert sorted(snap.models) == expected
    for word in ("readme.txt", "fake.gguf", "cut.gguf", "dangling.gguf", "p-00002-of-00003"):
        assert len(problems_about(snap, word)) == 1, (word, snap.problems)
    assert all(p.endswith(".") for p in snap.problems)


def test_a_models_directory_that_cannot_be_listed_is_a_problem_not_a_crash(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # EACCES even for root (NFS with root_squash), or for `llamad models` run by a user:
    # one problem line, and the other directories are still served.
    locked, other = tmp_path / "locked", tmp_path / "other"
    ggufgen.write_model(locked / "a.gguf")
    ggufgen.write_model(other / "b.gguf")
    age(tmp_path)
    scandir = os.scandir

    def denied(path: str | os.PathLike[str]) -> object:
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", denied)  # the module discover.py lists with
    snap = scan(config(locked, other))
    assert sorted(snap.models) == ["b"]
    assert len(problems_about(snap, str(locked))) == 1, snap.problems


def test_file_still_being_written_waits(tmp_path: Path) -> None:
    d = tmp_path / "models"
    ggufgen.write_model(d / "fresh.gguf")
    snap = scan(config(d), settle=30)
    assert "fresh" not in snap.models and snap.pending
    assert problems_about(snap, "still being written")
    age(d)
    later = scan(config(d), settle=30)
    assert "fresh" in later.models and not later.pending


def test_a_file_dated_in_the_future_is_served_not_held_for_ever(tmp_path: Path) -> None:
    # An mtime ahead of the clock (a tarball from a machine whose clock runs ahead, `touch
    # -d tomorrow`) tells nothing about a write in progress: waiting until the clock
    # passes it would hide the model for as long, with a rescan every settle window.
    d = tmp_path / "models"
    ahead = time.time() + 86_400
    os.utime(ggufgen.write_model(d / "tomorrow.gguf"), (ahead, ahead))
    snap = scan(config(d), settle=30)
    assert "tomorrow" in snap.models and not snap.pending


def test_llama_cache_layout(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    snap_dir = cache_repo(hub, "ggml-org/tiny-GGUF", {
        "tiny-Q4_K_M.gguf": "model", "tiny-Q8_0.gguf": "model",
        "mmproj-tiny-F16.gguf": "mmproj", "big/tiny-F16-00001-of-00002.gguf": "model",
        "big/tiny-F16-00002-of-00002.gguf": "model", "imatrix.gguf": "model"})
    (hub / "models--bad").mkdir()
    (hub / "not-a-repo").mkdir()
    age(hub)
    snap = scan(config(cache=hub))
    assert sorted(snap.models) == ["ggml-org/tiny-GGUF:F16", "ggml-org/tiny-GGUF:Q4_K_M",
                                   "ggml-org/tiny-GGUF:Q8_0"]
    q4 = snap.models["ggml-org/tiny-GGUF:Q4_K_M"]
    assert q4.source == "cache" and q4.mmproj == snap_dir / "mmproj-tiny-F16.gguf"
    assert q4.unit.startswith("llama-server@ggml-org-tiny-GGUF:Q4_K_M-")
    assert len(snap.models["ggml-org/tiny-GGUF:F16"].shards) == 2
    assert scan(config(cache=hub, llama_cache=False)).models == {}


def test_cache_directory_follows_llama_cpp_environment(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    from llamad.config import cache_dir
    for var in ("LLAMA_CACHE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME",
                "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    c = Config.default()
    assert cache_dir(c) == tmp_path / ".cache/huggingface/hub"
    monkeypatch.setenv("HF_HOME", "/hf")
    assert cache_dir(c) == Path("/hf/hub")
    monkeypatch.setenv("LLAMA_CACHE", "/lc")
    assert cache_dir(c) == Path("/lc")
    assert cache_dir(Config.default(llama_cache_dir=Path("/x"))) == Path("/x")


def test_name_conflicts_are_reported_not_shadowed(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    ggufgen.write_model(a / "same.gguf")
    ggufgen.write_model(b / "same.gguf")
    ggufgen.write_model(b / "same" / "other.gguf")
    age(tmp_path)
    snap = scan(config(a, b))
    assert snap.models["same"].path == a / "same.gguf"
    assert len(problems_about(snap, "'same' is used by both")) == 2


def test_presets_add_and_adjust_models(tmp_path: Path) -> None:
    d, hub = tmp_path / "models", tmp_path / "hub"
    ggufgen.write_model(d / "base.gguf")
    extra = ggufgen.write_model(tmp_path / "elsewhere" / "x.gguf")
    cache_repo(hub, "u/r", {"r-Q4_K_M.gguf": "model"})
    (tmp_path / "presets").mkdir()
    age(tmp_path)
    preset = parse_presets(
        "[*]\nngl = 9\n[base]\nalias = b1, shared\npin = true\n"
        "[custom]\nmodel = ../elsewhere/x.gguf\nalias = shared\n"
        "[hf]\nhf-repo = u/r:q4_k_m\n[missing-hf]\nhf-repo = u/none:Q8_0\n"
        "[nothing]\nc = 1\n", tmp_path / "presets" / "p.ini")
    snap = scan(config(d, cache=hub), preset=preset)
    assert snap.models["base"].source == "preset" and snap.models["base"].settings.pin
    assert snap.models["custom"].path == tmp_path / "presets" / "../elsewhere/x.gguf"
    assert snap.models["custom"].path.resolve() == extra
    assert snap.models["hf"].path.name == "r-Q4_K_M.gguf"
    assert "u/r:Q4_K_M" in snap.models  # without dedup-cache-models both stay
    assert snap.resolve("b1") is snap.models["base"]
    assert snap.resolve("shared") is snap.models["base"]  # first claim wins
    assert problems_about(snap, "alias 'shared'")
    assert problems_about(snap, "u/none:Q8_0 is not in the llama.cpp cache")
    assert problems_about(snap, "preset [nothing] matches no model")
    assert snap.resolve("nope") is None
    # NAME:latest is NAME, as Ollama lists models and its users name them everywhere.
    assert snap.resolve("base:latest") is snap.resolve("b1:latest") is snap.models["base"]
    assert snap.resolve("nope:latest") is None and snap.resolve("base:q8_0") is None


def test_a_section_without_its_model_holds_no_name(tmp_path: Path) -> None:
    """The shipped presets.ini gives [gemma3-270m] the alias gemma; with no such model
    installed, the quick start's gemma.gguf is still model gemma."""
    d = tmp_path / "models"
    ggufgen.write_model(d / "gemma.gguf")
    ggufgen.write_model(d / "chat.gguf")
    age(tmp_path)
    preset = parse_presets("[gemma3-270m]\nalias = gemma\n[chat-model]\nmodel = nowhere.gguf\n"
                           "[served]\nmodel = models/chat.gguf\nalias = chat\n",
                           tmp_path / "p.ini")
    snap = scan(config(d), preset=preset)
    assert snap.resolve("gemma") is snap.models["gemma"]
    assert "chat" not in snap.models and snap.resolve("chat") is snap.models["served"]


def test_dedup_cache_models_hides_the_cache_entry(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    cache_repo(hub, "u/r", {"r-Q4_K_M.gguf": "model"})
    age(hub)
    cache_repo(hub, "u/d", {"d-F32.gguf": "draft"})
    age(hub)
    text = "[nice]\nhf-repo = u/r:Q4_K_M\nspec-draft-hf = u/d\n"
    for dedup in (text + "dedup-cache-models = true\n",
                  "[*]\ndedup-cache-models = 1\n" + text):
        models = scan(config(cache=hub), preset=parse_presets(dedup)).models
        # Hidden from the list, still served under its name (as in router mode).
        assert {m.id for m in models.values() if m.hidden} == {"u/r:Q4_K_M", "u/d:F32"}
        nice = models["nice"]
        assert not nice.hidden and nice.path == models["u/r:Q4_K_M"].path
        assert nice.settings.args[nice.settings.args.index("--model-draft") + 1] == \
            str(models["u/d:F32"].path)
    models = scan(config(cache=hub), preset=parse_presets(text)).models
    assert not any(m.hidden for m in models.values())


def test_global_args_reach_every_model(tmp_path: Path) -> None:
    d = tmp_path / "m"
    ggufgen.write_model(d / "a.gguf")
    age(d)
    snap = scan(config(d, args=("-c", "8192", "-ngl", "99")))
    assert snap.models["a"].settings.args == (
        "--model", str(d / "a.gguf"), "--alias", "a", "--ctx-size", "8192",
        "--n-gpu-layers", "99")


def test_split_names() -> None:
    assert split_info("m-Q4-00001-of-00003.gguf") == ("m-Q4", 1, 3)
    assert split_info("m-1-of-3.gguf") is None and split_info("plain.gguf") is None


def test_catalog_change_feed(tmp_path: Path) -> None:
    d = tmp_path / "m"
    ggufgen.write_model(d / "a.gguf")
    age(d)
    catalog = Catalog(config(d))
    changes: list[tuple[set[str], set[str]]] = []
    unsubscribe = catalog.subscribe(lambda old, new: changes.append((set(old.models),
                                                                     set(new.models))))
    first = catalog.rescan()
    assert changes == [(set(), {"a"})]
    assert catalog.rescan() is not first and len(changes) == 1  # nothing changed, no event
    (d / "a.gguf").rename(d / "b.gguf")
    catalog.rescan()
    assert changes[-1] == ({"a"}, {"b"})
    unsubscribe()
    (d / "b.gguf").unlink()
    catalog.rescan()
    assert len(changes) == 2 and catalog.snapshot.models == {}
    with pytest.raises(TypeError):
        catalog.snapshot.models["x"] = first.models["a"]  # type: ignore[index]
