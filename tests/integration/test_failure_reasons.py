"""Failures a new user meets, told as sentences that name the cause: in the 503 body, in
`/v1/models` and in llamad's journal. And exits.py's table read against systemd itself."""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import rig
from helpers import readme
from helpers.daemon import PYTHON, Factory, Llamad, chat, models, wait_http, wait_state
from helpers.ports import free_port

from llamad.systemd import exits

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def box_dir(box: rig.Box, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh directory inside the box under the parent the test names (indirect)."""
    path = Path(request.param) / f"llamad-exits-{uuid.uuid4().hex[:8]}"
    box.run(["mkdir", "-p", str(path)])
    yield path
    box.run(["rm", "-rf", str(path)])


async def failure(d: Llamad, model: str) -> tuple[str, str]:
    """(the 503 message, the reason /v1/models shows) once the model has failed."""
    async with aiohttp.ClientSession() as s:
        status, body = await chat(s, d.url, model)
    assert status == 503, body
    wait_state(d.url, model, "failed")
    return body["error"]["message"], models(d.url)[model]["llamad"]["reason"]


@pytest.mark.parametrize("box_dir", ["/var/tmp"], indirect=True)
async def test_llama_server_under_var_tmp(llamad_factory: Factory, box: rig.Box,
                                          assets: rig.Assets, box_dir: Path) -> None:
    server = box_dir / "llama-server"
    box.run(["ln", "-s", str(assets.llama_server), str(server)])
    d = llamad_factory(["gemma-a"], **{"llama-server": server})
    sentence = (f"systemd failed executing llama-server (exit status 203/EXEC); likely cause: "
                f"{server} is under /var/tmp, which model units see as an empty private "
                "directory (PrivateTmp=yes); put llama-server where every user may run it, "
                "such as /usr/local/bin")
    message, reason = await failure(d, "gemma-a")
    assert sentence in message and reason.startswith(sentence), (message, reason)
    assert f"model gemma-a failed: {sentence}" in d.log()
    # llamad said so when it started, as check-config does.
    assert f"{d.config}: llama-server: {server} is under /var/tmp, which model units see as " \
        "an empty private directory (PrivateTmp=yes)" in d.log()


@pytest.mark.parametrize("box_dir", ["/root"], indirect=True)
async def test_model_under_root(llamad_factory: Factory, box: rig.Box, assets: rig.Assets,
                                box_dir: Path) -> None:
    model = box_dir / "gemma.gguf"
    box.run(["ln", "-s", str(assets.model), str(model)])
    d = llamad_factory([], **{"models-dir": box_dir})
    sentence = (f"llama-server ended with exit status 1; likely cause: the model file {model} "
                "is not readable by the model units' dynamic user: directory /root has mode "
                "0700; keep models in /var/lib/llamad/models, readable by every user")
    message, reason = await failure(d, "gemma")
    assert sentence in message and reason.startswith(sentence), (message, reason)
    assert f"model gemma failed: {sentence}" in d.log()


async def test_llama_server_not_installed(llamad_factory: Factory) -> None:
    # The quick start's `install ... llama-server /usr/local/bin/` skipped.
    server = "/usr/local/lib/llamad-test-none/llama-server"
    d = llamad_factory(["gemma-a"], **{"llama-server": server})
    sentence = (f"systemd failed executing llama-server (exit status 203/EXEC); likely cause: "
                f"{server} does not exist; install llama-server there, or set llama-server "
                "in llamad.conf to its path")
    message, reason = await failure(d, "gemma-a")
    assert sentence in message and reason.startswith(sentence), (message, reason)


async def test_unknown_model(llamad_factory: Factory) -> None:
    # A typo in the quick start's curl command.
    d = llamad_factory(["gemma"])
    async with aiohttp.ClientSession() as s:
        status, body = await chat(s, d.url, "gema")
    assert status == 404 and body["error"]["message"] == \
        "model 'gema' is not known to llamad; GET /v1/models lists them"


def test_curl_without_a_json_content_type(llamad_factory: Factory) -> None:
    # The quick start's curl without its -H: curl -d sends a form's Content-Type, and no
    # Origin, so it is no browser's: answered, as Ollama answers its docs' curl -d.
    d = llamad_factory(["gemma"])
    [line] = [readme.command(c) for c in readme.quick_start()[1] if c.startswith("curl ")]
    cmd = re.sub(r" -H '[^']*'", "", line).replace("http://127.0.0.1:8080", d.url)
    assert "Content-Type" not in cmd, cmd
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    assert json.loads(out)["choices"][0]["text"], out
    # From a web page (an Origin) a form's type is refused, before anything happens.
    page = cmd.replace("curl ", f"curl -H 'Origin: {d.url}' ", 1)
    out = subprocess.run(["bash", "-c", page], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    assert json.loads(out)["error"]["message"] == (
        "the request body must be application/json (Content-Type), not "
        "application/x-www-form-urlencoded")


def test_status_names_are_systemds(box: rig.Box) -> None:
    # systemd prints its own name for each status: `status=203/EXEC`.
    statuses = " ".join(map(str, exits.SYSTEMD_STATUSES))
    out = box.run(f"for n in {statuses}; do u=llamad-exit-$n-{uuid.uuid4().hex[:6]}; "
                  "systemd-run -q --wait --unit=$u sh -c \"exit $n\" 2>/dev/null; "
                  "systemctl status --no-pager $u | grep -o 'status=[0-9]*/[A-Z_]*'; "
                  "systemctl reset-failed $u; done", check=False, timeout=300).stdout
    shown = {int(k): v for k, v in re.findall(r"status=(\d+)/(\w+)", out)}
    table = {k: name for k, (name, _) in exits.SYSTEMD_STATUSES.items()}
    assert shown == {k: v for k, v in table.items() if k in shown}
    assert set(table) - set(shown) <= {245}, out  # KSM is newer than systemd 252


def test_another_program_on_the_port_is_named(box: rig.Box, assets: rig.Assets) -> None:
    """llama-server's default port is llamad.socket's too: where one already listens, the
    socket the package starts fails; check-config (the quick start's next step) says why,
    and `llamad ps` says it was not llamad that answered. The box shares the host's
    network, so the llama-server runs here."""
    conf = box.workdir / "port-taken.conf"
    conf.write_text(f"llama-server = {assets.llama_server}\nmodels-dir = {box.workdir}\n")
    llamad = [str(PYTHON), "-m", "llamad"]
    check = [*llamad, "check-config", "--config", str(conf)]
    units = Path("/etc/systemd/system")
    addr = f"127.0.0.1:{free_port()}"
    server = subprocess.Popen([str(rig.LLAMA_SERVER), "-m", str(rig.GEMMA), "-t", "1",
                               "--port", addr.split(":")[1]], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://{addr}", timeout=120)  # loaded: its answers are the same each time
        # The package's units; the socket moved to the port taken.
        text = (ROOT / "units" / "llamad.socket").read_text()
        box.run(["tee", str(units / "llamad.socket")], input=text.replace("127.0.0.1:8080", addr))
        box.run(["cp", str(ROOT / "units" / "llamad.service"), str(units)])
        box.run("systemctl daemon-reload")
        assert box.run("systemctl start llamad.socket", check=False).returncode != 0
        out = box.run(check)
        assert out.stderr == (
            f"llamad: warning: llamad.socket failed: another program listens on {addr} "
            "(`ss -ltnp` names it); stop it, or move llamad with `systemctl edit "
            "llamad.socket`, then `systemctl restart llamad.socket`\n"), out.stderr
        out = box.run([*llamad, "ps"], check=False)
        assert (out.returncode, out.stderr) == (1, (
            f"llamad: http://{addr} answered 'File Not Found' (HTTP 404), not as llamad: "
            "another program may hold llamad's port; `llamad check-config` says\n")), out
        server.terminate()
        server.wait(30)
        box.run("systemctl restart llamad.socket")
        assert box.run(check).stderr == ""
    finally:
        server.kill()
        server.wait(30)
        box.run(f"systemctl stop llamad.socket; rm -f {units}/llamad.socket "
                f"{units}/llamad.service; systemctl daemon-reload; "
                "systemctl reset-failed llamad.socket", check=False)
