"""`llamad models` and `llamad check-config`: the catalog without a running daemon."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from llamad import redact
from llamad.catalog import modelkeys
from llamad.catalog.catalog import SETTLE_SECONDS, Model, Snapshot, scan
from llamad.catalog.gguf_info import InfoCache
from llamad.catalog.presets import Presets, SwaFits, global_flags, load_presets, parse_args
from llamad.config import Config, load_config
from llamad.errors import ConfigError
from llamad.http import keys
from llamad.memory.gpu import GpuMonitor
from llamad.memory.measure import Measure
from llamad.supervisor.guards import kvpolicy
from llamad.systemd import socketstate, unitpaths


def cache_path() -> Path:
    """Per-user metadata cache, so a second `llamad models` need not read headers again."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llamad" / "gguf-info.json"


def check(config: Config) -> None:
    """What llamad serve checks of llamad.conf beyond parsing it; raises ConfigError."""
    parse_args(config.args, f"{config.path or 'configuration'}: args",
               global_flags(config.llama_server))
    if config.api_keys_file is not None:
        keys.load(config.api_keys_file)
    if config.peer_key_file is not None:
        keys.load_peer_key(config.peer_key_file)
    server = config.llama_server
    if not (server.is_file() and os.access(server, os.X_OK)):
        raise ConfigError(f"{config.path or 'configuration'}: llama-server = {str(server)!r} "
                          "is not an executable file; install llama.cpp's llama-server or "
                          "set llama-server to its path.")


def preset_servers(presets: Presets) -> dict[str, Path]:
    """The llama-server binaries the presets name, by where they are named."""
    out: dict[str, Path] = {}
    for section in (presets.defaults, *presets.sections.values()):
        server = section.extra.get(modelkeys.SERVER)
        if isinstance(server, Path):
            out[f"{presets.path} [{section.name}]"] = server
    return out


def _gpu_problems(nvml: Any = None) -> list[str]:
    """What check-config says of the GPUs: persistence mode off (NVML; none without)."""
    gpu_log = logging.getLogger("llamad.gpu")
    level, gpu_log.level = gpu_log.level, logging.WARNING  # "no GPU" is no problem here
    try:
        monitor = GpuMonitor(nvml=nvml)
    finally:
        gpu_log.setLevel(level)
    try:
        off = monitor.persistence_off()
    finally:
        monitor.close()
    return [f"persistence mode is off on {', '.join(off)}: each model start initialises "
            "the GPU first (1-3 s); turn it on with `nvidia-smi -pm 1` or the "
            "nvidia-persistenced service"] if off else []


def cmd_check_config(config_path: Path | None) -> int:
    config = load_config(config_path)
    check(config)
    presets = load_presets(config.models_preset, server=config.llama_server)
    for warning in [*unitpaths.config_problems(config), *socketstate.problems(),
                    *unitpaths.server_problems(config, preset_servers(presets)),
                    *presets.ignored, *_gpu_problems()]:
        print(f"llamad: warning: {warning}", file=sys.stderr)
    if presets.errors:  # every one, each naming file, line, section and key
        for error in presets.errors.values():
            print(f"llamad: {redact.text(error.message)}", file=sys.stderr)
        return 1
    where = config.path or "defaults (no configuration file)"
    dirs = ", ".join(map(str, config.models_dirs)) or "none"
    preset = f"{config.models_preset} ({len(presets.sections)} sections)" \
        if config.models_preset else "none"
    store = config.ollama_models
    ollama = f"ollama-models {store}; " if store is not None and store.is_dir() else ""
    print(f"{where}: OK; models-dir {dirs}; {ollama}presets {preset}; backend {config.backend}; "
          f"models-max {config.models_max}; llama-server {config.llama_server}")
    return 0


def model_json(m: Model) -> dict[str, Any]:
    info = m.info
    return {
        "id": m.id, "aliases": list(m.aliases), "unit": m.unit, "path": str(m.path),
        "shards": [str(s) for s in m.shards], "mmproj": str(m.mmproj) if m.mmproj else None,
        "size": info.size if info else None,
        "architecture": info.architecture if info else None,
        "parameters": info.parameters if info else None,
        "context_length": info.context_length if info else None,
        "quantization": info.quantization if info else None,
        "modalities": list(info.modalities) if info else ["text"],
        "source": m.source, "created": m.created, "args": list(m.settings.args),
    }


def _human(n: int | None, units: str = "BKMGTP", step: int = 1024) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in units:
        if value < step or unit == units[-1]:
            return f"{value:.0f}{unit}" if unit == units[0] else f"{value:.1f}{unit}"
        value /= step
    return str(n)


def _text(m: Model) -> list[str]:
    info = m.info
    params = _human(info.parameters, " KMBT", 1000).strip() if info else "-"
    head = (f"{m.id}  {m.source}  {_human(info.size if info else None)}  "
            f"{info.architecture if info else '-'}  {params} params  "
            f"ctx {info.context_length if info and info.context_length else '-'}")
    lines = [head, f"  unit:    {m.unit}", f"  path:    {m.path}"]
    lines += [f"  shard:   {s}" for s in m.shards[1:]]
    if m.mmproj:
        lines.append(f"  mmproj:  {m.mmproj}")
    if m.aliases:
        lines.append(f"  aliases: {', '.join(m.aliases)}")
    return lines


def _swa_fits(config: Config) -> SwaFits:
    """--swa-full where the daemon would add it (kv-cache = auto: where it fits), NVML
    opened quietly at the first sliding-window model."""
    found: list[SwaFits] = []

    def fits(info: Any, args: tuple[str, ...]) -> str | None:
        if not found:
            gpu_log = logging.getLogger("llamad.gpu")
            level, gpu_log.level = gpu_log.level, logging.WARNING
            try:
                found.append(kvpolicy.swa_full_fits(config, Measure(config)))
            finally:
                gpu_log.setLevel(level)
        return found[0](info, args)
    return fits


def settled_scan(config: Config, cache: InfoCache, rounds: int = 3) -> Snapshot:
    """A scan that waits out the settle window for files that were just written, so a
    model copied in a moment ago is listed rather than left out; a file still growing
    after `rounds` windows is reported as still being written."""
    swa_fits = _swa_fits(config)
    snapshot = scan(config, cache=cache, swa_fits=swa_fits)
    for _ in range(rounds):
        if not snapshot.pending:
            break
        time.sleep(SETTLE_SECONDS)
        snapshot = scan(config, cache=cache, swa_fits=swa_fits)
    return snapshot


def cmd_models(config_path: Path | None, as_json: bool) -> int:
    config = load_config(config_path)
    cache = InfoCache(cache_path())
    snapshot = settled_scan(config, cache)
    cache.save()
    models = sorted(snapshot.models.values(), key=lambda m: m.id)
    for problem in snapshot.problems:
        print(f"llamad: {problem}", file=sys.stderr)
    if as_json:
        # One write: json.dump writes each token separately, seconds for 10,000 models.
        sys.stdout.write(json.dumps([model_json(m) for m in models], indent=2) + "\n")
    elif not models:
        print("no models found in " + (", ".join(map(str, config.models_dirs)) or "no directory"))
    else:
        print("\n".join(line for m in models for line in _text(m)))
    return 0
