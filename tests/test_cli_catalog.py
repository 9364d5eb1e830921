"""`llamad models` and `llamad check-config` run as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ggufgen

ROOT = Path(__file__).parent.parent


def llamad(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XDG_CACHE_HOME": str(home / "cache"), "HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "llamad", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=60)


def setup(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    ggufgen.write_split(models / "Big", "big-Q4_K_M", 2)
    ggufgen.write_mmproj(models / "Big" / "mmproj-big.gguf")
    os.symlink(ggufgen.GEMMA, models / "gemma.gguf")
    (models / "junk.gguf").write_bytes(b"junk")
    for p in (models / "Big").iterdir():
        os.utime(p, (1, 1_000_000_000))
    (tmp_path / "presets.ini").write_text("[gemma]\nalias = g\nc = 4096\n")
    conf = tmp_path / "llamad.conf"
    conf.write_text(f"models-dir = {models}\nllama-cache = no\nllama-server = /bin/true\n"
                    f"models-preset = {tmp_path / 'presets.ini'}\n")
    return conf


def test_models_json(tmp_path: Path) -> None:
    conf = setup(tmp_path)
    run = llamad("models", "--config", str(conf), "--json", home=tmp_path)
    assert run.returncode == 0, run.stderr
    models = {m["id"]: m for m in json.loads(run.stdout)}
    assert sorted(models) == ["Big", "gemma"]
    for m in models.values():
        assert {"id", "unit", "path", "size", "source"} <= m.keys()
    gemma, big = models["gemma"], models["Big"]
    assert gemma["aliases"] == ["g"] and gemma["source"] == "preset"
    assert gemma["architecture"] == "gemma3" and gemma["context_length"] == 32768
    assert gemma["size"] == ggufgen.GEMMA.stat().st_size and gemma["parameters"] > 2e8
    assert gemma["unit"] == "llama-server@gemma.service"
    assert big["mmproj"].endswith("mmproj-big.gguf") and len(big["shards"]) == 2
    assert big["modalities"] == ["text", "image"]
    assert "junk.gguf" in run.stderr and run.stderr.count("\n") == 1
    # The second run reads the metadata cache the first one wrote.
    assert (tmp_path / "cache" / "llamad" / "gguf-info.json").exists()
    again = llamad("models", "--config", str(conf), "--json", home=tmp_path)
    assert json.loads(again.stdout) == json.loads(run.stdout)


def test_models_text(tmp_path: Path) -> None:
    run = llamad("models", "--config", str(setup(tmp_path)), home=tmp_path)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("Big  models_dir") and "gemma  preset" in run.stdout
    for field in ("unit:    llama-server@Big.service", "mmproj:", "shard:", "aliases: g",
                  "gemma3", "ctx 32768"):
        assert field in run.stdout, field


def test_check_config_ok_and_bad(tmp_path: Path) -> None:
    conf = setup(tmp_path)
    ok = llamad("check-config", "--config", str(conf), home=tmp_path)
    assert ok.returncode == 0 and ok.stdout.count("\n") == 1
    assert ok.stdout.startswith(f"{conf}: OK;") and "(1 sections)" in ok.stdout
    cases = {
        "models-max = many\n": "models-max = 'many' is invalid",
        "llama-server = /nonexistent\n": "is not an executable file",
        "args = --port 1\n": "set by llamad itself",
    }
    for line, message in cases.items():
        conf.write_text(line)
        bad = llamad("check-config", "--config", str(conf), home=tmp_path)
        assert bad.returncode == 1 and message in bad.stderr, bad.stderr
        assert bad.stderr.count("\n") == 1 and bad.stdout == ""
    (tmp_path / "presets.ini").write_text("[x]\nfrobnicate = 1\n")
    conf.write_text(f"llama-server = /bin/true\nmodels-preset = {tmp_path / 'presets.ini'}\n")
    bad = llamad("check-config", "--config", str(conf), home=tmp_path)
    assert bad.returncode == 1 and "[x]: unknown key 'frobnicate'" in bad.stderr
    missing = llamad("check-config", "--config", str(tmp_path / "none.conf"), home=tmp_path)
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def test_version_and_usage(tmp_path: Path) -> None:
    version = llamad("--version", home=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("llamad ")
    assert llamad(home=tmp_path).returncode == 2
