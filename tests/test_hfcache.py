"""The download cache checked against llama.cpp's own choices (common/download.cpp,
find_best_sibling: a projector counts only from the model's folder or a folder above it,
whole path components compared)."""

from __future__ import annotations

from pathlib import Path

from llamad.catalog import hfcache

COMMIT = "c" * 40


def cached(root: Path, files: list[str]) -> Path:
    """A repository in llama.cpp's cache with these files in its snapshot."""
    repo = root / "models--org--m"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs/main").write_text(COMMIT)
    snap = repo / "snapshots" / COMMIT
    for f in files:
        (snap / f).parent.mkdir(parents=True, exist_ok=True)
        (snap / f).write_bytes(b"GGUF")
    return snap


def test_a_projector_in_a_folder_whose_name_prefixes_the_models_is_not_its(
        tmp_path: Path) -> None:
    # `a/` is not above `ab/`: llama-server -hf org/m:Q4_K_M (checked against the fake hub)
    # takes no projector here, so llamad must not pass --mmproj a/mmproj-m-f16.gguf.
    cached(tmp_path, ["ab/m-Q4_K_M.gguf", "a/mmproj-m-f16.gguf"])
    assert hfcache.discover(tmp_path) == [
        ("org/m:Q4_K_M", (tmp_path / f"models--org--m/snapshots/{COMMIT}/ab/m-Q4_K_M.gguf",),
         None)]


def test_a_projector_above_the_models_folder_is_still_found(tmp_path: Path) -> None:
    snap = cached(tmp_path, ["ab/m-Q4_K_M.gguf", "mmproj-m-f16.gguf", "a/mmproj-m-Q8_0.gguf"])
    [(_, _, mmproj)] = hfcache.discover(tmp_path)
    assert mmproj == snap / "mmproj-m-f16.gguf"
