"""The .deb end to end: built and installed by the commands of README.md's quick start
(tests/helpers/readme.py), into a booted Debian 12 and a booted Debian 13, each with its own
python3-* packages; used from the host with the official openai client, then removed and
purged.

The tests run in file order and share one box per release: installing packages changes
the whole system, and `apt remove` stops every model unit, which would pull the rug from
under tests using the shared box. `make test-trixie` runs the Debian 13 half alone.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gzip
import json
import re
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import ollama
import openai
import pytest
import rig
from helpers import readme
from helpers.fakehub import FakeHub
from helpers.ports import free_port
from prometheus_client.parser import text_string_to_metric_families

from llamad.systemd.unitname import unit_name

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MODEL = "gemma"
QUESTION = "What is the capital of France? Answer with one word."
QUICK_START = readme.quick_start()[1]
# What each of the quick start's commands must print (every one must also succeed).
SHOWS = {
    "llamad check-config": "/etc/llamad/llamad.conf: OK;",
    "llamad models": "gemma  models_dir",
    "curl": '"text":" 100 degrees Celsius."',  # greedy, so the same answer every time
    "llamad ps": "gemma  ready",
    "journalctl": f"Started llama-server@{MODEL}.service",
}
# Debian 12 is the host's own root under the box's overlay; Debian 13 a cached debootstrap.
RELEASES = {"debian12": lambda: Path("/"), "debian13": rig.debian13_root}


def clone_deb(box: rig.Box, deb: Path) -> Path:
    """Where the box's user has the .deb: dist/ of their clone."""
    return box.workdir / "clone" / "dist" / deb.name


@pytest.fixture(scope="module")
def deb() -> Path:
    # The quick start's first command, run where a user runs it: in the clone.
    assert readme.command(QUICK_START[0]) == "make deb"
    subprocess.run(["make", "-C", str(ROOT), "--no-print-directory", "deb"], check=True,
                   timeout=1800, stdout=subprocess.DEVNULL)
    version = subprocess.run(
        ["dpkg-parsechangelog", "-l", str(ROOT / "packaging" / "debian" / "changelog"),
         "-S", "Version"], check=True, capture_output=True, text=True).stdout.strip()
    path = ROOT / "dist" / f"llamad_{version}_all.deb"
    assert path.is_file()
    return path


@pytest.fixture(scope="module", params=list(RELEASES))
def pkgbox(request: pytest.FixtureRequest) -> Iterator[rig.Box]:
    reason = rig.missing_requirements()
    if reason:
        pytest.fail(reason)
    with rig.Box(RELEASES[request.param]()) as box:
        # The host's Docker-style policy-rc.d forbids starting services from
        # maintainer scripts; a real system has none, and the test wants the
        # maintainer scripts to run as they would there.
        box.run("rm -f /usr/sbin/policy-rc.d")
        yield box


@pytest.fixture(scope="module")
def quick_start(pkgbox: rig.Box, deb: Path) -> tuple[int, dict[str, str]]:
    """The package installed by the README's commands, run as a user would in the clone
    (holding dist/ and what `make dev` built under ~/.cache/llamad-ci). Returns the API's
    port and each command's output."""
    box = pkgbox
    assets = rig.Assets(box.workdir)
    port = free_port()
    # An admin's drop-in, written before the install so the socket that the
    # postinst starts already uses this port, since boxes share the host's network.
    box.run(f"mkdir -p /etc/systemd/system/llamad.socket.d && printf "
            f"'[Socket]\\nListenStream=\\nListenStream=127.0.0.1:{port}\\n' "
            f"> /etc/systemd/system/llamad.socket.d/port.conf")
    clone = box.workdir / "clone"
    clone_deb(box, deb).parent.mkdir(parents=True)
    shutil.copyfile(deb, clone_deb(box, deb))
    # What `make dev` built, where the README says: the host's own files in a box over
    # the host's root, links to the same files in the Debian 13 one.
    for built, asset in ((rig.LLAMA_SERVER, assets.llama_server), (rig.GEMMA, assets.model)):
        where = Path("/root/.cache/llamad-ci") / built.relative_to(rig.CACHE)
        box.run(f"test -e {where} || {{ mkdir -p {where.parent} && ln -s {asset} {where}; }}")
    box.run("apt-get update -qq", timeout=300)
    # The user answers yes to apt's question.
    box.run("echo 'APT::Get::Assume-Yes \"true\";' > /etc/apt/apt.conf.d/90yes")
    shown = {}
    for line in QUICK_START[1:]:
        cmd = readme.command(line).replace("127.0.0.1:8080", f"127.0.0.1:{port}")
        out = box.run(["bash", "-c", f"cd {clone} && DEBIAN_FRONTEND=noninteractive {cmd}"],
                      check=False, timeout=900)
        assert out.returncode == 0, (cmd, out.stdout[-3000:], out.stderr[-3000:])
        shown[cmd] = out.stdout
    return port, shown


@pytest.fixture(scope="module")
def installed(quick_start: tuple[int, dict[str, str]]) -> str:
    """The API's base URL."""
    return f"http://127.0.0.1:{quick_start[0]}/v1"


def test_quick_start_commands_show_what_they_promise(
        quick_start: tuple[int, dict[str, str]]) -> None:
    _, shown = quick_start
    for prefix, want in SHOWS.items():
        [(cmd, out)] = [(c, o) for c, o in shown.items() if c.startswith(prefix)]
        assert want in out, (cmd, out[-2000:])


@pytest.fixture(scope="module")
def client(installed: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=installed, api_key="unused", timeout=300, max_retries=0)


def test_installed_with_debians_python(pkgbox: rig.Box, installed: str) -> None:
    # llamad must run on Debian's packages, not on anything pip put on the host.
    out = pkgbox.run(["/usr/bin/python3", "-c", "import aiohttp, numpy, pystemd; "
                      "print(aiohttp.__file__, numpy.__file__, pystemd.__file__)"]).stdout
    assert out.split() == [f"/usr/lib/python3/dist-packages/{m}/__init__.py"
                           for m in ("aiohttp", "numpy", "pystemd")]
    assert pkgbox.run("systemctl is-enabled llamad.socket").stdout.strip() == "enabled"
    assert pkgbox.run("llamad check-config").returncode == 0


def test_installed_units_verify(pkgbox: rig.Box, installed: str) -> None:
    out = pkgbox.run("systemd-analyze verify llamad.socket llamad.service llama-server.slice",
                     check=False)
    assert (out.returncode, out.stdout + out.stderr) == (0, "")


def test_models_listed(client: openai.OpenAI) -> None:
    assert MODEL in [m.id for m in client.models.list()]


def test_chat_completion(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=16)
    assert (reply.choices[0].message.content or "").strip()


def test_chat_completion_streamed(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=16,
        stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 2 and text.strip()


def test_model_log_in_journal(pkgbox: rig.Box, client: openai.OpenAI) -> None:
    log = pkgbox.run(["journalctl", "--no-pager", "-u", "llama-server@*"]).stdout
    assert f"Started llama-server@{MODEL}.service" in log
    assert "llama-server[" in log  # the server's own output, not only systemd's


def test_observability_in_the_sandbox(pkgbox: rig.Box, client: openai.OpenAI,
                                      installed: str) -> None:
    """The sandboxed llamad.service writes the request log, serves /metrics and reads the
    journal; the installed CLI (Debian's python3) talks to it."""
    base = installed.removesuffix("/v1")
    log = rig.wait_for("the request log", lambda: pkgbox.run(
        ["journalctl", "-u", "llamad", f"MODEL={MODEL}", "-o", "json"]).stdout.splitlines())
    statuses = [json.loads(line)["STATUS"] for line in log]
    # A client may hang up once it has what it wants (nginx's 499); llamad never failed one.
    assert "200" in statuses and set(statuses) <= {"200", "499"}, log
    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        families = {f.name: f.samples for f in text_string_to_metric_families(r.read().decode())}
    assert sum(s.value for s in families["llamad_requests"] if s.labels["model"] == MODEL) >= 2
    assert families["llamacpp:prompt_tokens"][0].labels == {"model": MODEL}
    lines = pkgbox.run(["llamad", "logs", "-n", "3", MODEL, "--url", base]).stdout
    assert lines.count(f" llama-server@{MODEL}.service: ") == 3
    assert pkgbox.run(["llamad", "ps", "--url", base]).stdout.splitlines()[1].split()[:2] == [
        MODEL, "ready"]


def test_status_line(pkgbox: rig.Box, client: openai.OpenAI) -> None:
    out = pkgbox.run("systemctl status --no-pager llamad.service", check=False).stdout
    assert re.search(r"^\s+Status: \".+\"$", out, re.M), out


def test_model_runs_unprivileged_in_the_slice(pkgbox: rig.Box, client: openai.OpenAI) -> None:
    unit = f"llama-server@{MODEL}.service"
    out = pkgbox.run(["systemctl", "show", "-p", "DynamicUser", "-p", "Slice",
                      "-p", "ActiveState", unit]).stdout
    props = dict(line.split("=", 1) for line in out.splitlines())
    assert props == {"DynamicUser": "yes", "Slice": "llama-server.slice", "ActiveState": "active"}


def test_web_ui_and_dashboard(installed: str) -> None:
    """The UI the package ships in /usr/share/llamad/ui and the dashboard, served by
    Debian's aiohttp."""
    base = installed.removesuffix("/v1")
    with urllib.request.urlopen(base + "/", timeout=30) as r:
        page = r.read().decode()
        assert r.headers["Cross-Origin-Opener-Policy"] == "same-origin"
    assert 'href="dashboard"' in page
    bundle = next(p for p in page.split('"') if p.endswith(".js") and "/immutable/" in p)
    request = urllib.request.Request(base + "/" + bundle.removeprefix("./"),
                                     headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=30) as r:
        assert r.headers["Content-Encoding"] == "gzip"
        assert r.headers["Content-Type"] == "text/javascript; charset=utf-8"
        assert len(gzip.decompress(r.read())) > 1_000_000
    with urllib.request.urlopen(base + "/dashboard", timeout=30) as r:
        assert "dashboard/dashboard.js" in r.read().decode()
        dashboard_policy = r.headers["Content-Security-Policy"]
    # security-review-3 L7: nothing sniffed, the pages run only their own scripts and may
    # not be framed, data answers run nothing.
    with urllib.request.urlopen(base + "/", timeout=30) as r:
        ui_policy = r.headers["Content-Security-Policy"]
        assert r.headers["X-Content-Type-Options"] == "nosniff"
    with urllib.request.urlopen(base + "/v1/models", timeout=30) as r:
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert "sandbox" in r.headers["Content-Security-Policy"]
    for policy in (ui_policy, dashboard_policy):
        assert "frame-ancestors 'none'" in policy and "script-src 'self'" in policy
    with urllib.request.urlopen(base + "/dashboard/events", timeout=30) as r:
        assert r.readline() == b"event: hello\n"
        hello = json.loads(r.readline().decode().removeprefix("data: "))
        assert hello["ids"] == [MODEL]


def test_a_multipart_bomb_leaves_the_installed_llamad_standing(pkgbox: rig.Box,
                                                             installed: str) -> None:
    """security-review-3 M2: two uploads of 30 MiB of tiny parts OOM-killed the shipped
    llamad.service (MemoryMax=1G) through email's parser; now each is one 400."""
    base = installed.removesuffix("/v1")
    pid = pkgbox.run("systemctl show -P MainPID llamad.service").stdout.strip()
    restarts = pkgbox.run("systemctl show -P NRestarts llamad.service").stdout.strip()
    parts = b"--b\r\n\r\nx\r\n" * 3_000_000 + b"--b--\r\n"

    def upload() -> int:
        request = urllib.request.Request(base + "/v1/audio/transcriptions", data=parts,
                                         headers={"Content-Type":
                                                  "multipart/form-data; boundary=b"})
        try:
            urllib.request.urlopen(request, timeout=120).close()
        except urllib.error.HTTPError as e:
            return e.code
        return 200
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        assert list(pool.map(lambda _: upload(), range(2))) == [400, 400]
    assert pkgbox.run("systemctl show -P MainPID llamad.service").stdout.strip() == pid
    assert pkgbox.run("systemctl show -P NRestarts llamad.service").stdout.strip() == restarts
    # The test box does not enforce MemoryMax= (cgroup v1): what llamad held is the measure
    # (2.1 GiB before, for the two bodies; now the bodies themselves and little more).
    status = pkgbox.run(["cat", f"/proc/{pid}/status"]).stdout
    peak_kib = int(next(x for x in status.splitlines() if x.startswith("VmHWM:")).split()[1])
    assert peak_kib < 300 * 1024, peak_kib


def test_autopkgtest_smoke(pkgbox: rig.Box, installed: str) -> None:
    smoke = pkgbox.workdir / "smoke"  # the Debian 13 box does not see this checkout
    shutil.copyfile(ROOT / "packaging" / "debian" / "tests" / "smoke", smoke)
    out = pkgbox.run(["sh", str(smoke)], check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_upgrade_keeps_models_running(pkgbox: rig.Box, client: openai.OpenAI,
                                      deb: Path) -> None:
    unit = f"llama-server@{MODEL}.service"
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                   max_tokens=4)
    pid = pkgbox.run(["systemctl", "show", "-P", "MainPID", unit]).stdout.strip()
    llamad_pid = pkgbox.run("systemctl show -P MainPID llamad.service").stdout.strip()
    pkgbox.run(f"DEBIAN_FRONTEND=noninteractive apt-get install -y -q --reinstall "
               f"{clone_deb(pkgbox, deb)}", timeout=300)
    # The upgrade restarted llamad, not the model it was serving.
    assert pkgbox.run("systemctl show -P MainPID llamad.service").stdout.strip() != llamad_pid
    assert pkgbox.run(["systemctl", "show", "-P", "MainPID", unit]).stdout.strip() == pid
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=8)
    assert reply.choices[0].message.content
    assert pkgbox.run(["systemctl", "show", "-P", "MainPID", unit]).stdout.strip() == pid


def test_pull_with_the_packages_defaults(pkgbox: rig.Box, client: openai.OpenAI) -> None:
    # `llamad pull` with nothing configured but the hub's address (the fake one on
    # loopback): Debian's Python runs the downloader in its unit, the file lands in the
    # package's cache (/var/lib/llamad/hub), and the model unit can read it there.
    box, repo = pkgbox, "org/gemma-3-270m-GGUF"
    with FakeHub() as hub:
        hub.add(repo, {"gemma-3-270m-Q4_K_M.gguf": rig.GEMMA.read_bytes()})
        box.run(f"cp /etc/llamad/llamad.conf /etc/llamad/llamad.conf.orig && "
                f"echo 'hf-endpoint = {hub.url}' >> /etc/llamad/llamad.conf && "
                "systemctl restart llamad.service")
        try:
            pulled = box.run(["llamad", "pull", repo], check=False, timeout=300)
            assert pulled.returncode == 0, pulled.stdout + pulled.stderr
            assert f"{repo}:Q4_K_M: in the cache" in pulled.stdout
            reply = client.chat.completions.create(
                model=f"{repo}:Q4_K_M", messages=[{"role": "user", "content": QUESTION}],
                max_tokens=8)
            assert reply.choices[0].message.content
            assert box.run(["llamad", "rm", f"{repo}:Q4_K_M"]).returncode == 0
            blobs = box.run("find /var/lib/llamad/hub -path '*/blobs/*' -type f").stdout
            assert blobs == ""
        finally:
            box.run("mv /etc/llamad/llamad.conf.orig /etc/llamad/llamad.conf && "
                    "systemctl restart llamad.service")


def test_moving_from_ollama(pkgbox: rig.Box, client: openai.OpenAI) -> None:
    # What an Ollama user has: models pulled into Ollama's store, where its Linux service
    # keeps them, and clients that speak to Ollama's port. With the package's defaults the
    # store is served as it appears, and the socket takes a second port as docs/operations.md
    # says (a free one here: boxes share the host's network).
    box, port = pkgbox, free_port()
    store = "/usr/share/ollama/.ollama/models"
    digest = "c" * 64
    manifest = json.dumps({"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}"}]})
    box.run(f"mkdir -p {store}/blobs {store}/manifests/registry.ollama.ai/library/gemma3 && "
            f"(ln /var/lib/llamad/models/{MODEL}.gguf {store}/blobs/sha256-{digest} || "
            f"cp /var/lib/llamad/models/{MODEL}.gguf {store}/blobs/sha256-{digest}) && "
            f"chmod -R a+rX /usr/share/ollama")
    box.run(["tee", f"{store}/manifests/registry.ollama.ai/library/gemma3/270m"],
            input=manifest)
    try:
        rig.wait_for("the running llamad to find Ollama's model",
                     lambda: "gemma3:270m" in (_ids(client) or []), timeout=60)
        moved = box.run("printf '[Socket]\\nListenStream=127.0.0.1:%d\\n' " + str(port) +
                        # after port.conf, which empties the list first
                        " > /etc/systemd/system/llamad.socket.d/zz-ollama.conf && "
                        "systemctl daemon-reload && systemctl stop llamad.socket llamad.service "
                        "&& systemctl start llamad.socket",
                        check=False)
        assert moved.returncode == 0, moved.stderr + box.run(
            "journalctl --no-pager -n 30 -u llamad.socket -u llamad.service").stdout
        ollama_client = ollama.Client(host=f"http://127.0.0.1:{port}")
        try:
            assert "gemma3:270m" in {m.model for m in ollama_client.list().models}
            answer = ollama_client.chat(model="gemma3:270m", options={"num_predict": 8},
                                        messages=[{"role": "user", "content": QUESTION}])
            assert answer.message.content and answer.model == "gemma3:270m"
        finally:
            ollama_client.close()  # type: ignore[no-untyped-call]  # ollama's has no hints
        argv = box.run(["systemctl", "show", "-P", "ExecStart",
                        unit_name("gemma3:270m")]).stdout
        assert f"{store}/blobs/sha256-{digest}" in argv, argv
        assert MODEL in (_ids(client) or [])  # the first port still answers
    finally:
        # llamad stopped first: it need not follow the store's removal on its way out.
        box.run("systemctl stop llamad.socket llamad.service && rm -rf /usr/share/ollama "
                "/etc/systemd/system/llamad.socket.d/zz-ollama.conf && systemctl daemon-reload "
                f"&& systemctl stop {unit_name('gemma3:270m')} && systemctl start llamad.socket",
                timeout=180)


def test_no_python_complaints_in_the_journal(pkgbox: rig.Box, client: openai.OpenAI) -> None:
    # Each release has its own Python, aiohttp and pystemd: llamad's journal (starts,
    # requests, the upgrade's restart) holds no traceback and no warning from them.
    log = pkgbox.run(["journalctl", "--no-pager", "-o", "cat", "-u", "llamad"]).stdout
    assert "Started llamad.service" in log
    assert not re.search(r"Traceback|Warning:|Exception", log), log[-3000:]


def test_security_exposure(pkgbox: rig.Box, installed: str) -> None:
    out = pkgbox.run("systemd-analyze security --no-pager llamad.service", check=False).stdout
    level = re.search(r"Overall exposure level for llamad.service: (\d+\.\d)", out)
    assert level and float(level.group(1)) <= 2.0, out


def test_crash_loop_keeps_the_socket(pkgbox: rig.Box, client: openai.OpenAI,
                                     installed: str) -> None:
    box = pkgbox
    port = int(installed.split(":")[2].split("/")[0])
    box.run("mkdir -p /etc/systemd/system/llamad.service.d && printf "
            "'[Service]\\nExecStart=\\nExecStart=/bin/false\\n' "
            "> /etc/systemd/system/llamad.service.d/crash.conf && systemctl daemon-reload "
            "&& systemctl stop llamad.service")

    def knock() -> None:
        # Each connection queues on the socket and triggers a start; the
        # recv timeout paces the loop.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /v1/models HTTP/1.0\r\n\r\n")
            s.settimeout(0.2)
            with contextlib.suppress(TimeoutError):
                s.recv(1)

    def restarts() -> int:
        knock()
        return int(box.run("systemctl show -P NRestarts llamad.service").stdout)

    # Far more crashes than systemd's default start limit (5 in 10 s) tolerates.
    rig.wait_for("llamad to crash 7 times", lambda: restarts() >= 7, timeout=60)
    assert box.run("systemctl show -P ActiveState llamad.socket").stdout.strip() == "active"

    box.run("rm -r /etc/systemd/system/llamad.service.d && systemctl daemon-reload")
    # The next automatic restart runs the real llamad again, on the same port.
    assert MODEL in rig.wait_for("llamad to answer again", lambda: _ids(client), timeout=60)


def _ids(client: openai.OpenAI) -> list[str] | None:
    try:
        return [m.id for m in client.models.list()]
    except openai.APIError:
        return None


def test_remove_stops_everything_and_purge_removes_config(pkgbox: rig.Box,
                                                          client: openai.OpenAI) -> None:
    box = pkgbox
    # A model is running before the removal.
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                   max_tokens=4)
    assert box.run(["systemctl", "is-active", f"llama-server@{MODEL}.service"]).stdout.strip() \
        == "active"

    box.run("DEBIAN_FRONTEND=noninteractive apt-get remove -y -q llamad", timeout=300)
    for unit in ("llamad.socket", "llamad.service", f"llama-server@{MODEL}.service"):
        state = box.run(["systemctl", "is-active", unit], check=False).stdout.strip()
        assert state in ("inactive", "failed"), (unit, state)
    assert box.run("systemctl list-units --no-legend --plain 'llama-server@*'").stdout == ""
    assert box.run(["pgrep", "-x", "llama-server"], check=False).returncode == 1
    assert box.run(["pgrep", "-f", "/usr/bin/llamad"], check=False).returncode == 1
    # remove keeps the configuration ...
    assert box.run("test -f /etc/llamad/llamad.conf", check=False).returncode == 0

    box.run("DEBIAN_FRONTEND=noninteractive apt-get purge -y -q llamad", timeout=300)
    # ... purge deletes it, but not the admin's models.
    assert box.run("test -e /etc/llamad", check=False).returncode == 1
    assert box.run(f"test -f /var/lib/llamad/models/{MODEL}.gguf", check=False).returncode == 0
    assert box.run("dpkg-query -W -f='${Status}' llamad", check=False).stdout \
        in ("", "unknown ok not-installed")
