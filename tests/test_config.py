"""Config file parsing: defaults, every kind of value, and one-sentence errors."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from llamad import config as cfg
from llamad.config import SPEC, Config, load_config
from llamad.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "llamad.conf"
    path.write_text(text)
    return path


def test_defaults_match_the_documented_values() -> None:
    c = Config.default()
    assert c.models_dirs == (Path("/var/lib/llamad/models"),)
    assert (c.models_max, c.models_autoload, c.backend) == (4, True, "unix")
    assert (c.idle_ttl, c.idle_exit, c.load_timeout, c.stop_timeout) == (0, 0, 300, 10)
    assert c.run_dir == Path("/run/llamad") and c.tcp_port_base == 39000
    assert c.listen == "127.0.0.1:8080" and c.args == () and c.api_keys_file is None
    assert c.dynamic_user and c.eviction_policy == "lru" and c.slice_memory_max is None


def test_reference_config_is_all_defaults() -> None:
    # etc/llamad.conf documents every key with its default, all commented out.
    reference = Path(__file__).parent.parent / "etc" / "llamad.conf"
    text = reference.read_text()
    for key in cfg.SPEC:
        assert f"# {key} =" in text, key
    assert load_config(reference) == Config.default(path=reference)


def test_values_are_parsed_into_types(tmp_path: Path) -> None:
    path = write(tmp_path, "models-dir = /a, /b\nargs = '-c 8192 --chat-template \"a b\"'\n"
                 "backend = tcp\nidle-ttl = 30\nmodels-autoload = no\nlisten = [::1]:80\n"
                 "slice-memory-max = 16G\nunit-user = llama\napi-keys-file = /etc/k\n"
                 "models-preset =\n")
    c = load_config(path)
    assert c.path == path
    assert c.models_dirs == (Path("/a"), Path("/b"))
    assert c.args == ("-c", "8192", "--chat-template", "a b")
    assert (c.backend, c.idle_ttl, c.models_autoload, c.listen) == ("tcp", 30.0, False, "[::1]:80")
    assert c.slice_memory_max == "16G" and not c.dynamic_user
    assert c.api_keys_file == Path("/etc/k") and c.models_preset is None


BAD = [
    ("models-max = -1", "models-max", "0 = unlimited"),
    ("models-max = lots", "models-max", "whole number"),
    ("backend = pipe", "backend", "unix or tcp"),
    ("idle-ttl = -5", "idle-ttl", "seconds from 0 to 9223372037 (0 = never)"),
    # Past Go's longest duration: /api/ps's expires_at was a date past year 9999 (a 500),
    # a systemd timer overflowed its 64 bits of microseconds.
    ("idle-ttl = 1e12", "idle-ttl", "seconds from 0 to 9223372037"),
    ("stop-timeout = 1e15", "stop-timeout", "seconds from 0 to 9223372037"),
    ("llama-cache = maybe", "llama-cache", "yes or no"),
    ("listen = localhost", "listen", "HOST:PORT"),
    ("slice-memory-max = lots", "slice-memory-max", "systemd size"),
    ("eviction-policy = random", "eviction-policy", "cheapest-reload"),
    ("tcp-port-base = 80", "tcp-port-base", "1024"),
    ("args = '-c \"unclosed'", "args", "shell syntax"),
    ("run-dir = relative", "run-dir", "absolute"),
    ("unit-user = Bad User", "unit-user", "user name"),
    ("listen = 127.0.0.1:99999", "listen", "1 to 65535"),
    ("listen = [::1]:0", "listen", "1 to 65535"),
    # Not a number of seconds: float() takes them, and a NaN passes every min= check. A NaN
    # timeout never fires (or breaks asyncio's timer heap), an infinite one never ends.
    *((f"{key} = {value}", key, SPEC[key][1]) for key, (check, _) in SPEC.items()
      if check.startswith("float") for value in ("nan", "inf", "1e999")),
]


@pytest.mark.parametrize(("line", "key", "allowed"), BAD)
def test_bad_value_names_file_key_value_and_range(tmp_path: Path, line: str, key: str,
                                                  allowed: str) -> None:
    path = write(tmp_path, "# a comment\n" + line + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = e.value.message
    value = line.split("=", 1)[1].strip()
    assert message.startswith(f"{path}:2: {key} = ")  # file, line, key
    assert value.strip("'") in message and allowed in message
    assert message.count(". ") == 0 and message.endswith(".")


def test_unknown_key_and_sections_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=":1: unknown key 'model-dir'"):
        load_config(write(tmp_path, "model-dir = /x\n"))
    with pytest.raises(ConfigError, match=r"section \[main\] is not allowed"):
        load_config(write(tmp_path, "[main]\nmodels-max = 2\n"))


def test_missing_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.conf")
    monkeypatch.setattr(cfg, "DEFAULT_PATH", tmp_path / "absent.conf")
    assert load_config() == Config.default()


def test_default_preset_file_is_used_only_when_present(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    presets = tmp_path / "presets.ini"
    monkeypatch.setattr(cfg, "DEFAULT_PRESETS", presets)
    assert Config.default().models_preset is None
    presets.write_text("[*]\n")
    assert Config.default().models_preset == presets
    assert load_config(write(tmp_path, "models-preset =\n")).models_preset is None


def test_config_is_frozen() -> None:
    c = Config.default()
    with pytest.raises(AttributeError):
        c.models_max = 3  # type: ignore[misc]


def test_percent_signs_are_taken_as_written(tmp_path: Path) -> None:
    """configobj's interpolation was on: `%(name)s` in a value became another key's value,
    or a MissingInterpolationOption traceback (from `llamad serve` too)."""
    c = load_config(write(tmp_path, "args = '--alias %(models-max)s --x %(nope)s'\n"))
    assert c.args == ("--alias", "%(models-max)s", "--x", "%(nope)s")


def test_every_documented_default_is_the_default(tmp_path: Path) -> None:
    """Uncommenting any `# key = value` line of etc/llamad.conf changes nothing: `# peers =`
    and `# cors-origins =` were refused as invalid."""
    reference = Path(__file__).parent.parent / "etc" / "llamad.conf"
    for line in reference.read_text().splitlines():
        key = line[2:].partition(" =")[0]
        if key in SPEC and line.startswith(f"# {key} =") and key != "models-preset":
            c = load_config(write(tmp_path, line[2:] + "\n"))
            assert c == Config.default(path=tmp_path / "llamad.conf"), line


def test_unknown_key_suggests_the_known_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "model-max = 2\n"))
    assert e.value.message == (f"{tmp_path / 'llamad.conf'}:1: unknown key 'model-max'; "
                               "did you mean 'models-max'?")


@pytest.mark.parametrize(("make", "said"), [
    (lambda p: p.mkdir(), "is a directory, not a configuration file."),
    (lambda p: p.write_bytes(b"models-dir = /m\xff\n"), "is not UTF-8 text"),
    (lambda p: p.write_text("models-max = 1\nmodels-max = 2\n"), "models-max is set twice"),
])
def test_unreadable_files_are_one_sentence(tmp_path: Path, make: Any, said: str) -> None:
    path = tmp_path / "llamad.conf"
    make(path)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert said in e.value.message and str(path) in e.value.message, e.value.message
    assert not e.value.message.endswith("..") and "\n" not in e.value.message


def test_the_reference_config_states_each_numeric_range() -> None:
    """A key's comment in etc/llamad.conf names the bounds its check enforces (those short of
    DURATION_MAX's "for ever"), so a reader learns them before llamad refuses a value."""
    reference = Path(__file__).parent.parent / "etc" / "llamad.conf"
    blocks = reference.read_text().split("\n\n")
    for key, (check, _) in SPEC.items():
        [block] = [b for b in blocks if f"\n# {key} =" in f"\n{b}"]
        for bound in re.findall(r"(?:min|max)=([0-9.]+)(?=[,)])", check):
            if float(bound) < 1e9:
                assert re.search(rf"(?<![0-9.]){re.escape(bound)}(?![0-9])", block), (key, bound)
