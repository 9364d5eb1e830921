"""`llamad models` and `llamad check-config` run as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import rig
from helpers import ggufgen
from helpers.ports import refused_url

ROOT = Path(__file__).parent.parent


def llamad(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XDG_CACHE_HOME": str(home / "cache"), "HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "llamad", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=60)


def setup(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    ggufgen.write_split(models / "Big", "big-Q4_K_M", 2)
    ggufgen.write_mmproj(models / "Big" / "mmproj-big.gguf")
    os.symlink(rig.GEMMA, models / "gemma.gguf")
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
    assert gemma["size"] == rig.GEMMA.stat().st_size and gemma["parameters"] > 2e8
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
    # A key llama.cpp's router sets itself is ignored, with a warning, as the router does.
    (tmp_path / "presets.ini").write_text("[x]\nport = 8081\n")
    router = llamad("check-config", "--config", str(conf), home=tmp_path)
    assert router.returncode == 0 and router.stdout.startswith(f"{conf}: OK;")
    assert (f"llamad: warning: {tmp_path / 'presets.ini'}:2 [x]: port is set by llamad itself "
            "(as llama.cpp's router sets it for each model); ignored.\n") in router.stderr
    missing = llamad("check-config", "--config", str(tmp_path / "none.conf"), home=tmp_path)
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def test_check_config_warns_about_paths_model_units_cannot_reach(tmp_path: Path,
                                                                  open_dir: Path) -> None:
    server = tmp_path / "llama-server"  # under /tmp: PrivateTmp hides it from units
    server.write_text("#!/bin/sh\n")
    server.chmod(0o755)
    models = open_dir / "models"
    models.mkdir(mode=0o700)
    cache = open_dir / "cache"
    cache.mkdir(mode=0o755)
    (cache / "hub").mkdir(mode=0o750)
    preset = tmp_path / "presets.ini"
    preset.write_text("")
    conf = open_dir / "llamad.conf"
    conf.write_text(f"llama-server = {server}\nmodels-dir = {models}\nmodels-preset = {preset}\n"
                    f"llama-cache-dir = {cache / 'hub'}\n")
    run = llamad("check-config", "--config", str(conf), home=tmp_path)
    assert run.returncode == 0 and run.stdout.startswith(f"{conf}: OK;"), run.stderr
    hidden = "which model units see as an empty private directory (PrivateTmp=yes)"
    assert run.stderr.splitlines() == [
        f"llamad: warning: {conf}: llama-server: {server} is under /tmp, {hidden}; put "
        "llama-server where every user may run it, such as /usr/local/bin.",
        f"llamad: warning: {conf}: models-dir: {models} is not reachable by the model units' "
        f"dynamic user: directory {models} has mode 0700; keep models in "
        "/var/lib/llamad/models, readable by every user.",
        f"llamad: warning: {conf}: models-preset: {preset} is under /tmp, which "
        "llamad.service see as an empty private directory (PrivateTmp=yes); keep it in "
        "/etc/llamad.",
        f"llamad: warning: {conf}: llama-cache-dir: {cache / 'hub'} is not reachable by the "
        f"model units' dynamic user: directory {cache / 'hub'} has mode 0750; set "
        "llama-cache-dir to a directory every user may read.",
    ]
    # The same places, reachable: no warning.
    models.chmod(0o755)
    (cache / "hub").chmod(0o755)
    conf.write_text(f"llama-server = /bin/true\nmodels-dir = {models}\nmodels-preset =\n"
                    f"llama-cache-dir = {cache / 'hub'}\n")
    run = llamad("check-config", "--config", str(conf), home=tmp_path)
    assert (run.returncode, run.stderr) == (0, "")


def test_models_waits_for_a_file_copied_a_moment_ago(tmp_path: Path) -> None:
    models = tmp_path / "models"
    fresh = ggufgen.write_model(models / "fresh.gguf")
    growing = ggufgen.write_model(models / "growing.gguf")
    conf = tmp_path / "llamad.conf"
    conf.write_text(f"models-dir = {models}\nllama-cache = no\nllama-server = /bin/true\n"
                    "models-preset =\n")
    now = time.time()
    os.utime(fresh, (now, now + 0.5))  # inside the settle window for 1.5 s
    done = threading.Event()

    def copying() -> None:  # a copy that goes on while `llamad models` runs
        while not done.wait(0.1):
            os.utime(growing)

    writer = threading.Thread(target=copying)
    writer.start()
    try:
        run = llamad("models", "--config", str(conf), "--json", home=tmp_path)
    finally:
        done.set()
        writer.join()
    assert run.returncode == 0, run.stderr
    assert [m["id"] for m in json.loads(run.stdout)] == ["fresh"]
    assert run.stderr == f"llamad: {growing} is still being written; it will be added when " \
        "done.\n"


def test_ps_without_a_daemon_says_what_to_start(tmp_path: Path) -> None:
    with refused_url() as url:
        run = llamad("ps", "--url", url, home=tmp_path)
    assert run.returncode == 1 and run.stderr.startswith(
        f"llamad: llamad is not running at {url} (connection refused); ")
    assert "`systemctl start llamad.socket`" in run.stderr and run.stderr.count("\n") == 1


def test_version_and_usage(tmp_path: Path) -> None:
    version = llamad("--version", home=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("llamad ")
    assert llamad(home=tmp_path).returncode == 2
