"""An outside reviewer's second look at the command line and llamad.conf, as a new user
meets them: each test is a mistake or habit (Ollama's commands, bash's completion of names
with a colon, relative paths) that once got a traceback, a silent misreading or nothing."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.ggufgen import write_model
from helpers.ports import refused_url

from llamad.__main__ import parser
from llamad.cli import completion
from llamad.config import SPEC, load_config
from llamad.errors import ConfigError


def llamad(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llamad", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "llamad.conf"
    path.write_text(text)
    return path


# -- llamad serve --listen -----------------------------------------------------------------


@pytest.mark.parametrize("listen", ["garbage", "localhost", "127.0.0.1:99999",
                                    "127.0.0.1:65536", "127.0.0.1:http"])
def test_serve_listen_that_is_not_host_port_is_a_usage_error(tmp_path: Path,
                                                              listen: str) -> None:
    """`llamad serve --listen localhost` was a ValueError traceback (an OverflowError for
    port 99999) from deep in the event loop; llama-server says which flag is wrong."""
    conf = write(tmp_path, "llama-cache = no\n")
    out = llamad("serve", "--config", str(conf), "--listen", listen)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert f"--listen: {listen!r} is not HOST:PORT" in last and "0 (any free one) to 65535" in last


# -- llamad.conf ---------------------------------------------------------------------------


def test_start_limit_burst_fits_systemds_unsigned_int(tmp_path: Path) -> None:
    """StartLimitBurst= is a D-Bus `u`: 2^32 passed every check, then every model's start
    failed converting it (pystemd: OverflowError)."""
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "start-limit-burst = 4294967296\n"))
    assert e.value.message.startswith(f"{tmp_path}/llamad.conf:1: start-limit-burst = ")
    assert "4294967295" in e.value.message
    assert load_config(write(tmp_path, "start-limit-burst = 4294967295\n")
                       ).start_limit_burst == 2**32 - 1


PATH_KEYS = ["models-dir", "llama-cache-dir", "ollama-models", "models-preset",
             "api-keys-file", "peer-key-file", "llama-server"]


@pytest.mark.parametrize("key", PATH_KEYS)
def test_a_relative_path_is_refused(tmp_path: Path, key: str) -> None:
    """llamad.service runs in /, check-config and `llamad models` where the user stands:
    `models-dir = models` listed ./models there ("OK") and served /models."""
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, f"# llamad.conf\n{key} = some/where\n"))
    message = e.value.message
    assert message.startswith(f"{tmp_path}/llamad.conf:2: {key} = 'some/where' is invalid")
    assert "absolute" in message and SPEC[key][1] in message


def test_one_relative_models_dir_among_absolute_ones_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r":1: models-dir = 'models' is invalid"):
        load_config(write(tmp_path, "models-dir = /var/lib/llamad/models, models\n"))
    assert load_config(write(tmp_path, "models-dir = /a, /b,\n")).models_dirs == (
        Path("/a"), Path("/b"))


def test_check_config_in_a_directory_holding_the_relative_path_still_says_so(
        tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    conf = write(tmp_path, "models-dir = models\nllama-cache = no\n")
    out = llamad("check-config", "--config", str(conf), cwd=tmp_path)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "models-dir = 'models'" in out.stderr


def test_a_key_given_twice_is_named_with_both_lines(tmp_path: Path) -> None:
    """configobj's "Duplicate keyword name at line 3." named neither the key nor where the
    first one is."""
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "models-max = 2\n# later\nmodels-max = 3\n"))
    assert e.value.message == (f"{tmp_path}/llamad.conf:3: models-max is set twice (lines 1 "
                               "and 3); keep one.")


@pytest.mark.parametrize("special", ["/dev/null", "fifo"])
def test_a_config_that_is_not_a_regular_file_is_said_so(tmp_path: Path,
                                                        special: str) -> None:
    """configobj said 'Config file not found' of /dev/null, which exists."""
    path = Path(special) if special.startswith("/") else tmp_path / special
    if not path.exists():
        os.mkfifo(path)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.message == (f"{path} is not a regular file (a device, a pipe or a "
                               "socket); give a configuration file's path.")


# -- Ollama's habits -------------------------------------------------------------------------


def test_ollamas_stop_unloads_and_its_list_lists(tmp_path: Path) -> None:
    """`ollama stop MODEL`, `ollama list`/`ls`: the same words work for llamad."""
    with refused_url() as url:
        out = llamad("stop", "gemma", "--url", url)
    assert out.returncode == 1 and out.stderr.startswith(f"llamad: llamad is not running at "
                                                         f"{url}"), out.stderr
    models = tmp_path / "models"
    models.mkdir()
    write_model(models / "tiny.gguf")
    conf = write(tmp_path, f"models-dir = {models}\nllama-cache = no\nollama-models =\n")
    for word in ("list", "ls"):
        out = llamad(word, "--config", str(conf))
        assert out.returncode == 0 and out.stdout.startswith("tiny  "), (word, out)
    assert "stop" in parser().format_help() and "list" in parser().format_help()


# -- bash completion -------------------------------------------------------------------------


def complete(line: str, tmp_path: Path) -> list[str]:
    """What bash offers for `line` (the cursor at its end): COMP_WORDS split as bash splits
    them with its default COMP_WORDBREAKS, where ':' and '=' are words of their own, and
    `llamad` on PATH running this checkout."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / "llamad").write_text(f'#!/bin/sh\nexec {sys.executable} -m llamad "$@"\n')
    (bindir / "llamad").chmod(0o755)
    words = re.findall(r"[:=]|[^\s:=]+", line) + ([""] if line.endswith(" ") else [])
    quoted = " ".join("'" + w.replace("'", "'\\''") + "'" for w in words)
    script = completion.bash(parser())
    out = subprocess.run(
        ["bash", "-c", f'{script}\nCOMP_LINE="$1"; COMP_POINT=${{#1}}; COMP_WORDS=({quoted}); '
         f'COMP_CWORD={len(words) - 1}; _llamad; printf "%s\\n" "${{COMPREPLY[@]}}"', "_",
         line], capture_output=True, text=True, check=True, timeout=60,
        env={**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}",
             "PYTHONPATH": str(Path(__file__).parent.parent)}, cwd=tmp_path)
    return sorted(filter(None, out.stdout.split("\n")))


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    models.mkdir()
    for name in ("gemma3:270m", "gemma3:1b", "qwen"):
        write_model(models / f"{name}.gguf")
    return write(tmp_path, f"models-dir = {models}\nllama-cache = no\nollama-models =\n")


def test_completion_lists_the_models_of_the_config_on_the_line(tmp_path: Path,
                                                               catalog: Path) -> None:
    assert complete(f"llamad load --config {catalog} q", tmp_path) == ["qwen"]


def test_completion_of_a_name_with_a_colon(tmp_path: Path, catalog: Path) -> None:
    """Ollama's and the hub's names hold a ':', which bash makes a word of its own: after
    `gemma3:` nothing was offered. bash replaces only the part after the colon."""
    assert complete(f"llamad load --config {catalog} gemma3:", tmp_path) == ["1b", "270m"]
    assert complete(f"llamad unload --config {catalog} gemma3:2", tmp_path) == ["270m"]
    assert complete(f"llamad load --config {catalog} gem", tmp_path) == [
        "gemma3:1b", "gemma3:270m"]


def test_completion_after_a_global_option_and_of_an_options_value(tmp_path: Path) -> None:
    """`llamad -v ps --w` offered nothing (the command was looked for in the first word
    only), and `--config <TAB>` offered options instead of files."""
    assert complete("llamad -v ps --w", tmp_path) == ["--watch"]
    (tmp_path / "my.conf").write_text("")
    assert complete("llamad models --config my", tmp_path) == ["my.conf"]


def test_the_url_help_says_where_the_address_comes_from() -> None:
    """The help left out llamad.socket, which comes before the config's listen
    (docs/operations.md, "The command line")."""
    commands = next(a for a in parser()._actions
                    if isinstance(a, argparse._SubParsersAction)).choices
    url = next(a for a in commands["ps"]._actions if a.dest == "url")
    assert "llamad.socket" in str(url.help)
