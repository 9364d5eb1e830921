"""Catalog 10,000 small GGUF files: cold scan, warm rescan, and the CLI's disk cache.

Run: .venv/bin/python bench/catalog_scan.py [--files N] [--keep DIR]
The warm second scan must take under 1 s; the script exits 1 if it does not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from helpers import ggufgen  # noqa: E402

from llamad.catalog.catalog import scan  # noqa: E402
from llamad.catalog.gguf_info import InfoCache  # noqa: E402
from llamad.config import Config  # noqa: E402

LIMIT_S = 1.0


def build(models: Path, n: int) -> None:
    """n model files: 90% single files at the top, the rest 2-shard sets in subdirectories."""
    template = ggufgen.write_model(models.parent / "template.gguf")
    data = template.read_bytes()
    subdirs = n // 20  # each holds two shards
    for i in range(n - 2 * subdirs):
        (models / f"model-{i:05d}.gguf").write_bytes(data)
    for i in range(subdirs):
        ggufgen.write_split(models / f"set-{i:04d}", "s", 2)
    old = time.time() - 3600
    for root, _, names in os.walk(models):
        for name in names:
            os.utime(os.path.join(root, name), (old, old))


def timed(label: str, fn, results: dict[str, float]):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    value = fn()
    results[label] = time.perf_counter() - start
    print(f"{label:<44} {results[label]:8.3f} s", flush=True)
    return value


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--keep", type=Path, help="build the tree here and leave it")
    opts = ap.parse_args()
    work = opts.keep or Path(tempfile.mkdtemp(prefix="llamad-bench-"))
    models = work / "models"
    models.mkdir(parents=True, exist_ok=True)
    results: dict[str, float] = {}
    try:
        timed(f"write {opts.files} GGUF files", lambda: build(models, opts.files), results)
        config = Config.default(models_dirs=(models,), llama_cache=False, models_preset=None)
        cache = InfoCache(work / "gguf-info.json")
        snap = timed("cold scan (every header read)", lambda: scan(config, cache=cache),
                     results)
        warm = timed("warm second scan (same process)", lambda: scan(config, cache=cache),
                     results)
        timed("save the metadata cache file", cache.save, results)
        fresh = timed("load the cache file (new process's view)",
                      lambda: InfoCache(work / "gguf-info.json"), results)
        timed("scan with the loaded cache", lambda: scan(config, cache=fresh), results)
        cli_env = {**os.environ, "XDG_CACHE_HOME": str(work / "xdg")}
        conf = work / "llamad.conf"
        conf.write_text(f"models-dir = {models}\nllama-cache = no\nmodels-preset =\n")
        cmd = [sys.executable, "-m", "llamad", "models", "--json", "--config", str(conf)]
        for label in ("llamad models --json, first run", "llamad models --json, second run"):
            out = timed(label, lambda: subprocess.run(cmd, env=cli_env, cwd=ROOT, check=True,
                                                      capture_output=True), results)
        listed = len(json.loads(out.stdout))
        print(f"models: {len(snap.models)} (cold), {len(warm.models)} (warm), {listed} (CLI); "
              f"files: {opts.files}; problems: {len(warm.problems)}")
        ok = results["warm second scan (same process)"] < LIMIT_S and \
            len(warm.models) == len(snap.models) == listed
        print(f"warm second scan under {LIMIT_S} s: {'yes' if ok else 'NO'}")
        return 0 if ok else 1
    finally:
        if opts.keep is None:
            shutil.rmtree(work)


if __name__ == "__main__":
    raise SystemExit(main())
