"""Per-model controls checked against llama.cpp's router presets and llama-swap's per-model
config: what a user of either expects a preset key to mean, and what reaches the unit."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from helpers import ggufgen

from llamad.catalog.catalog import scan
from llamad.catalog.gguf_info import InfoCache
from llamad.catalog.ollamastore import MODEL
from llamad.catalog.presetini import parse_ini
from llamad.catalog.presets import model_settings, parse_presets
from llamad.config import Config
from llamad.supervisor.scheduler import effective_ttl

M = Path("/m/x.gguf")


def pulled(store: Path, name: str) -> None:
    """A model in an Ollama store, as `ollama pull` leaves it: name is model/tag."""
    tmp = store / "blobs" / "partial"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    ggufgen.write_model(tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    tmp.rename(store / "blobs" / f"sha256-{digest}")
    manifest = store / "manifests/registry.ollama.ai/library" / name
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"layers": [
        {"mediaType": MODEL, "digest": f"sha256:{digest}", "size": 1}]}))


def test_a_section_named_like_an_ollama_model_applies_to_it(tmp_path: Path) -> None:
    """docs/operations.md: set an Ollama model's options 'in a preset section named like
    the model ([gemma3:270m])'. Only the llama.cpp cache's user/repo:TAG names are spelled
    with their tag in capitals, as the router spells them; gemma3:270m stays as written."""
    pulled(tmp_path / "ollama", "gemma3/270m")
    (tmp_path / "models").mkdir()
    (tmp_path / "p.ini").write_text("[gemma3:270m]\nctx-size = 1234\n"
                                    "[user/repo:q4_k_m]\nctx-size = 1\n")
    cfg = Config.default(models_dirs=(tmp_path / "models",), llama_cache=False,
                         ollama_models=tmp_path / "ollama", models_preset=tmp_path / "p.ini")
    snap = scan(cfg, cache=InfoCache())
    args = snap.models["gemma3:270m"].settings.args
    assert args[args.index("--ctx-size") + 1] == "1234", snap.problems
    assert not [p for p in snap.problems if "gemma3" in p]
    assert "user/repo:Q4_K_M" in parse_presets((tmp_path / "p.ini").read_text()).sections


def test_ttl_0_never_unloads_as_idle_ttl_0_and_llama_swap_ttl_0() -> None:
    """llamad.conf's idle-ttl 0 and llama-swap's `ttl: 0` both mean never unload; a preset's
    ttl = 0 stopped the model as soon as it was idle."""
    p = parse_presets("[x]\nttl = 0\n[y]\nttl = 30\n[z]\nttl = -1\n").check()
    ttl = {m: model_settings(m, M, None, p, {}).ttl for m in "xyz"}
    assert effective_ttl(None, ttl["x"], 300.0) is None  # never
    assert effective_ttl(None, ttl["y"], 300.0) == 30
    assert effective_ttl(None, ttl["z"], 300.0) == 300  # llamad.conf's idle-ttl
    assert effective_ttl(0.0, ttl["x"], 300.0) == 0  # a request's keep_alive 0 still wins
    assert "ttl = 0" in model_settings("x", M, None, p, {}).preset_text


def test_env_cannot_give_llama_server_an_api_key(tmp_path: Path) -> None:
    """LLAMA_API_KEY is llama-server's --api-key (common/arg.cpp), which llamad refuses as a
    key: in env it made every request llamad forwarded answer 401 while /health said ok."""
    path = tmp_path / "presets.ini"
    error = parse_presets("[x]\nc = 1\nenv = LLAMA_API_KEY=secret\n", path).errors["x"]
    assert error.message.startswith(f"{path}:3 [x]") and "LLAMA_API_KEY" in error.message
    assert "secret" not in error.message
    # The token llama.cpp reads for downloads stays allowed (masked where llamad shows it).
    assert not parse_presets("[x]\nenv = HF_TOKEN=hf_x\n").errors


def test_a_control_character_in_a_flags_value_is_a_preset_error(tmp_path: Path) -> None:
    """It would reach the unit's ExecStart=, which llamad refuses to send to systemd: the
    model failed at its first load, with no word of the preset file, line or key."""
    path = tmp_path / "presets.ini"
    p = parse_presets("[x]\nc = 1\nchat-template = a\x1bb\n[y]\nc = 2\n", path)
    message = p.errors["x"].message
    assert message.startswith(f"{path}:3 [x]") and "chat-template" in message
    assert "control characters" in message and set(p.errors) == {"x"}


def test_lines_end_only_where_llama_cpp_ends_them() -> None:
    """llama.cpp's INI grammar ends a line at \\r\\n, \\n or \\r; str.splitlines also at
    U+2028 and others, which made the rest of a value a key of its own."""
    [section] = parse_ini("[x]\nchat-template = a\u2028ctx-size = 9\r\nc = 1\rjinja = on\n",
                          "p.ini")
    assert [k for k, _, _ in section.items] == ["chat-template", "c", "jinja"]
    assert section.items[0][1] == "a\u2028ctx-size = 9" and not section.errors
