#!/usr/bin/python3
"""Stand in for llama-server in llama.cpp's own server tests: LLAMA_SERVER_BIN_PATH=this.

The upstream tests start "llama-server" with a router-mode command line (--models-dir,
--models-max, --models-preset, --no-models-autoload, --api-key, --host, --port, and the
per-model flags every child gets). This turns that command line into a llamad.conf and
runs the real `llamad serve` in the test box (tests/rig.py) as a Type=notify unit, whose
models are real llama-server units. A single-model command line (-m / -hf, as the
non-router test files use) becomes a llamad with that one model only, named by --alias,
with llama-server's defaults for what llamad otherwise adds (no --metrics). llama.cpp's
web UI is llamad's too (ui-dir), unless --no-ui; several --host addresses are a socket
unit's, as llamad.socket's are.

It runs until SIGTERM or SIGINT (what the tests' ServerProcess.stop sends), then stops
llamad and every model unit, in well under the 5 s the tests wait before SIGKILL. A
launcher that was killed outright leaves units behind: the next one stops them first.
Standard library only; the box is named by the JSON file in $LLAMAD_CONFORMANCE.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

UNIT = "llamad-conformance.service"
# Several --host addresses: a socket unit listening on each starts llamad, as
# llamad.socket does (llamad's own `listen` is one address).
SOCKET = "llamad-conformance.socket"
# llama-server's own request delay for its tests, in seconds (server-models.cpp).
FAKE_TIMING_SECONDS = 2
# Flags of the router itself, and the value each takes (None: a switch).
ROUTER_FLAGS = {"--host": "host", "--port": "port", "--models-dir": "models_dir",
                "--models-max": "models_max", "--models-preset": "models_preset",
                "--api-key": "api_key", "--no-models-autoload": None, "--offline": None,
                "--model": "model", "-m": "model", "--hf-repo": "hf_repo", "-hf": "hf_repo",
                "-hfr": "hf_repo", "--hf-file": "hf_file", "-hff": "hf_file",
                "--alias": "alias", "-a": "alias", "--tags": "tags", "--no-ui": None}
# Per-model flags whose value is a file: made absolute, as the model units run elsewhere.
PATH_FLAGS = ("--chat-template-file", "--lora", "--model-draft", "-md", "--slot-save-path",
              "--media-path", "--grammar-file", "--json-schema-file")


def parse(argv: list[str]) -> tuple[dict[str, str], list[str], set[str]]:
    """(router values, the per-model flags left, router switches seen)."""
    values: dict[str, str] = {}
    switches: set[str] = set()
    rest: list[str] = []
    i = 0
    while i < len(argv):
        flag = argv[i]
        if flag in ROUTER_FLAGS:
            name = ROUTER_FLAGS[flag]
            if name is None:
                switches.add(flag)
            else:
                values[name] = argv[i + 1]
                i += 1
        elif flag in PATH_FLAGS and i + 1 < len(argv):
            rest += [flag, str(Path.cwd() / argv[i + 1])]
            i += 1
        else:
            rest.append(flag)
        i += 1
    return values, rest, switches


def config(box: dict[str, str], values: dict[str, str], rest: list[str],
           switches: set[str], where: Path) -> str:
    """The llamad.conf for this command line."""
    cwd = Path.cwd()
    cache = Path(os.environ.get("LLAMA_CACHE", "tmp"))
    conf = {
        "listen": f"{values.get('host', '127.0.0.1').split(',')[0]}:{values.get('port', 8080)}",
        "llama-server": box["llama_server"], "state-dir": str(where / "state"),
        "llama-cache-dir": str(cwd / cache), "models-dir": "",
        "args": shlex.join(rest), "restart-sec": "0.5",
        "models-autoload": "no" if "--no-models-autoload" in switches else "yes",
        # llama.cpp's web UI at /, as llama-server serves it unless --no-ui.
        "ui-dir": "" if "--no-ui" in switches else box.get("ui_dir", ""),
    }
    preset = single_model(values, cwd, cwd / cache)
    if preset:  # that one model only, as llama-server lists: not the rest of the cache
        conf["llama-cache"] = "no"
    # llama-server's switch delays requests in its router only.
    if os.environ.get("LLAMA_SERVER_DEBUG_FAKE_TIMING") and not preset:
        conf["debug-request-delay"] = str(FAKE_TIMING_SECONDS)
    if "models_dir" in values:
        conf["models-dir"] = str(cwd / values["models_dir"])
    if "models_max" in values:
        conf["models-max"] = values["models_max"]
    if preset:
        conf["models-max"] = "1"
        (where / "single.ini").write_text(preset)
        conf["models-preset"] = str(where / "single.ini")
    elif "models_preset" in values:
        conf["models-preset"] = str(cwd / values["models_preset"])
    else:
        conf["models-preset"] = ""
    # Settings to try a case with (not used by run.py): "key=value,key=value".
    for item in filter(None, os.environ.get("LLAMAD_CONFORMANCE_SET", "").split(",")):
        key, _, value = item.partition("=")
        conf[key.strip()] = value.strip()
    # Where POST /models downloads from: the fake hub the run serves on loopback.
    if os.environ.get("MODEL_ENDPOINT"):
        conf["hf-endpoint"] = os.environ["MODEL_ENDPOINT"]
    if "api_key" in values:
        keys = where / "api-keys"
        # The router's key may do everything, loading and unloading included.
        keys.write_text("".join(f"{k} admin\n" for k in values["api_key"].split(",")))
        keys.chmod(0o600)
        conf["api-keys-file"] = str(keys)
    # configobj: a value with spaces or commas in double quotes (it has no escapes).
    return "".join(f'{k} = "{v}"\n' if set(str(v)) & {" ", ","} else f"{k} = {v}\n"
                   for k, v in conf.items())


def single_model(values: dict[str, str], cwd: Path, cache: Path) -> str:
    """A preset for a single-model command line (-m / -hf), or ''.

    llama-server names its one model after the first of its aliases in sorted order (it
    keeps them in a std::set), and lists them all, with its tags."""
    if "model" not in values and "hf_repo" not in values:
        return ""
    aliases = sorted(a.strip() for a in values.get("alias", "").split(",") if a.strip())
    name = aliases[0] if aliases else values.get("hf_repo") or Path(values["model"]).stem
    model = cwd / values["model"] if "model" in values else \
        cached_file(cache, values["hf_repo"], values.get("hf_file"))
    lines = [f"[{name}]", f"model = {model}"]
    if aliases:
        lines.append(f"alias = {','.join(aliases)}")
    if "tags" in values:
        lines.append(f"tags = {values['tags']}")
    # llama-server's /metrics is off unless --metrics (then in the args, which win); llamad
    # turns it on for every model otherwise, for its own /metrics.
    lines.append("metrics = false")
    return "\n".join(lines) + "\n"


def cached_file(cache: Path, repo: str, file: str | None) -> Path:
    """The file `-hf repo[:TAG]` (or `--hf-file`) means in a Hugging Face hub cache; a
    path that does not exist if the cache lacks it (llamad then says so)."""
    repo, _, tag = repo.partition(":")
    folder = cache / ("models--" + repo.replace("/", "--"))
    ref = folder / "refs" / "main"
    snapshot = folder / "snapshots" / (ref.read_text().strip() if ref.exists() else "none")
    if file:
        return snapshot / file
    found = sorted(p for p in snapshot.glob("*.gguf") if tag.lower() in p.name.lower())
    return found[0] if found else snapshot / "missing.gguf"


class Box:
    def __init__(self, info: dict[str, str]) -> None:
        self.pid = info["pid"]

    def run(self, *argv: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SYSTEMD_PAGER": "", "LANG": "C.UTF-8"}
        return subprocess.run(["nsenter", "-t", str(self.pid), "-a", *argv], env=env,
                              capture_output=True, text=True, check=check, timeout=60)

    def stop_all(self) -> None:
        """llamad, then every model unit (llamad leaves them running on purpose)."""
        self.run("systemctl", "stop", SOCKET, UNIT)
        self.run("systemctl", "stop", "llama-server@*.service")
        self.run("systemctl", "reset-failed", SOCKET, UNIT, "llama-server@*.service")

    def active(self) -> bool:
        """llamad runs, or its socket waits to start it."""
        state, listening = (self.run("systemctl", "show", "-P", "ActiveState", unit).stdout.strip()
                            for unit in (UNIT, SOCKET))
        return state in ("active", "activating", "reloading") or \
            (state == "inactive" and listening == "active")


def sockets(values: dict[str, str]) -> list[str]:
    """systemd-run options for a socket unit, if --host names several addresses."""
    hosts = values.get("host", "127.0.0.1").split(",")
    if len(hosts) < 2:
        return []
    port = values.get("port", "8080")
    return [f"--socket-property=ListenStream={f'[{h}]' if ':' in h else h}:{port}"
            for h in hosts]


def fetch_first(box: Box, info: dict[str, str], values: dict[str, str],
                switches: set[str]) -> None:
    """`-hf REPO` of a file the cache lacks: fetched first, as llama-server does at its start,
    with llamad's own downloader in a unit of its own. A repository holding a preset.ini
    (llama.cpp's "remote preset") makes this a router with that preset, as it makes
    llama-server one."""
    endpoint = os.environ.get("MODEL_ENDPOINT")
    repo = values.get("hf_repo")
    cache = Path.cwd() / os.environ.get("LLAMA_CACHE", "tmp")
    if not endpoint or not repo or "--offline" in switches or \
            cached_file(cache, repo, values.get("hf_file")).exists():
        return
    fetched = box.run("systemd-run", "--wait", "--quiet", "--collect", "-p", "Type=exec",
                      "-p", "ProtectSystem=strict", "-p", f"ReadWritePaths={cache}",
                      info["python"], "-m", "llamad.catalog.fetch", "--cache", str(cache),
                      "--endpoint", endpoint, "--", repo)
    print(f"launcher: fetched {repo}: {fetched.stdout.strip()} {fetched.stderr.strip()}",
          flush=True)
    preset = cached_file(cache, repo, "preset.ini")
    if preset.exists():
        values.pop("hf_repo")
        values["models_preset"] = str(preset)


def main(argv: list[str]) -> int:
    info = json.loads(Path(os.environ["LLAMAD_CONFORMANCE"]).read_text())
    box = Box(info)
    box.stop_all()  # a launcher killed outright may have left these
    where = Path(info["workdir"]) / f"launch-{os.getpid()}-{time.monotonic_ns()}"
    where.mkdir(mode=0o755)
    values, rest, switches = parse(argv)
    fetch_first(box, info, values, switches)
    (where / "llamad.conf").write_text(config(info, values, rest, switches, where))
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    started = box.run("systemd-run", f"--unit={UNIT}", *sockets(values), "-p", "Type=notify",
                      "-p", "NotifyAccess=main", "--setenv=PYTHONUNBUFFERED=1",
                      info["python"], "-m", "llamad", "serve",
                      "--config", str(where / "llamad.conf"))
    if started.returncode != 0:
        print(f"launcher: llamad did not start: {started.stderr.strip()}", file=sys.stderr)
        print(box.run("journalctl", "--no-pager", "-o", "cat", "-n", "30", "-u", UNIT).stdout,
              file=sys.stderr)
        box.stop_all()
        return 1
    print(f"launcher: llamad runs as {UNIT} with {where / 'llamad.conf'}", flush=True)
    while not stopping and box.active():
        time.sleep(0.2)
    died = not stopping
    if died:
        print(box.run("journalctl", "--no-pager", "-o", "cat", "-n", "30", "-u", UNIT).stdout,
              file=sys.stderr)
    box.stop_all()
    return 1 if died else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
