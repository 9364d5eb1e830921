"""The downloader (llamad.catalog.fetch) as its unit runs it, a process of its own, against
the fake hub on loopback: what lands in the cache, what it tells systemd, and each way the
hub can fail it. (tests/integration/test_downloads.py runs it in its systemd unit.)"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import rig
from helpers.fakehub import TOKEN, FakeHub, File, blob
from helpers.ports import refused_url

from llamad.catalog import hfcache, hub

REPO = "org/model-GGUF"
Q4 = "model-Q4_K_M.gguf"
Q8 = "model-Q8_0.gguf"
MMPROJ = "mmproj-model-f16.gguf"


@pytest.fixture
def fake_hub() -> Iterator[FakeHub]:
    with FakeHub(cdn_host="localhost") as h:
        h.add(REPO, {Q4: blob(300_000, 1), Q8: blob(200_000, 2), MMPROJ: blob(50_000, 3),
                     "README.md": b"# a model\n"})
        yield h


class Notify:
    """A NOTIFY_SOCKET of our own: the messages the worker would send systemd."""

    def __init__(self, where: Path) -> None:
        self.path = where / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def read(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except BlockingIOError:
                return self.messages

    def statuses(self) -> list[dict[str, object]]:
        return [json.loads(line[7:]) for m in self.read() for line in m.splitlines()
                if line.startswith("STATUS=")]

    def ready(self) -> bool:
        return any("READY=1" in m.splitlines() for m in self.read())


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[Notify]:
    n = Notify(tmp_path)
    yield n
    n.sock.close()


def start(fake: FakeHub, cache: Path, name: str, notify: Notify | None = None,
          token: str | None = None, *extra: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "MODEL_ENDPOINT")}
    if notify is not None:
        env["NOTIFY_SOCKET"] = str(notify.path)
    if token is not None:
        creds = cache.parent / "creds"
        creds.mkdir(exist_ok=True)
        (creds / "hf-token").write_text(token + "\n")
        env["CREDENTIALS_DIRECTORY"] = str(creds)
    return subprocess.Popen([sys.executable, "-m", "llamad.catalog.fetch", "--cache",
                             str(cache), "--endpoint", fake.url, *extra, name],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def fetch(fake: FakeHub, cache: Path, name: str, notify: Notify | None = None,
          token: str | None = None, *extra: str) -> tuple[int, str]:
    proc = start(fake, cache, name, notify, token, *extra)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    path = tmp_path / "hub"
    path.mkdir()
    return path


def test_pull_lands_in_the_cache_layout(fake_hub: FakeHub, cache: Path, notify: Notify) -> None:
    code, out = fetch(fake_hub, cache, REPO, notify)
    assert code == 0, out
    repo = fake_hub.repos[REPO]
    found = hfcache.discover(cache)
    assert [(m, [p.name for p in shards], mm.name if mm else None) for m, shards, mm in found] \
        == [(f"{REPO}:Q4_K_M", [Q4], MMPROJ)]  # the default choice, and its projector
    snap = cache / "models--org--model-GGUF" / "snapshots" / repo.commit
    assert (cache / "models--org--model-GGUF/refs/main").read_text() == repo.commit
    for name in (Q4, MMPROJ):
        assert (snap / name).is_symlink()  # into blobs/, as llama.cpp links
        assert (snap / name).read_bytes() == fake_hub.file(REPO, name).data
        assert os.readlink(snap / name) == f"../../blobs/{fake_hub.file(REPO, name).oid}"
    assert not (snap / Q8).exists() and not list(cache.rglob("*" + hub.PARTIAL))
    ready = [m for m in notify.read() if "READY=1" in m]
    assert len(ready) == 1
    plan = json.loads(ready[0].split("STATUS=", 1)[1])
    assert plan["model"] == f"{REPO}:Q4_K_M" and plan["commit"] == repo.commit
    assert plan["files"] == [Q4, MMPROJ] and plan["total"] == 350_000
    assert notify.statuses()[-1]["done"] == 350_000
    # Big files went to the CDN, another origin: the token never would have.
    assert fake_hub.gets(fake_hub.file(REPO, Q4).oid)


def test_a_tag_picks_its_file_and_a_missing_tag_lists_what_there_is(
        fake_hub: FakeHub, cache: Path, notify: Notify) -> None:
    assert fetch(fake_hub, cache, f"{REPO}:q8_0")[0] == 0
    assert [m for m, _, _ in hfcache.discover(cache)] == [f"{REPO}:Q8_0"]
    code, out = fetch(fake_hub, cache, f"{REPO}:Q5_K_M", notify)
    assert code == fetch_module().EXIT_PERMANENT
    error = str(notify.statuses()[-1]["error"])
    assert "has no Q5_K_M model file; it has: " in error and Q4 in error, out
    assert not notify.ready()


def fetch_module() -> ModuleType:
    from llamad.catalog import fetch as module
    return module


def test_gated_repository_needs_the_token_and_it_goes_to_the_hub_only(
        fake_hub: FakeHub, cache: Path, notify: Notify) -> None:
    fake_hub.add("org/gated", {"g-Q4_K_M.gguf": blob(5000, 4)}, gated=True)
    code, _ = fetch(fake_hub, cache, "org/gated", notify)
    assert code == 65 and not notify.ready()
    assert "refuses file g-Q4_K_M.gguf of org/gated without a token" in \
        str(notify.statuses()[-1]["error"])
    assert "Access to model org/gated is restricted" in str(notify.statuses()[-1]["error"])
    code, out = fetch(fake_hub, cache, "org/gated", None, "hf_" + "x" * 34)
    assert code == 65 and "with this token" in out
    code, out = fetch(fake_hub, cache, "org/gated", None, TOKEN)
    assert code == 0, out
    assert TOKEN not in out  # never printed
    resolves = [s for s in fake_hub.seen if "/resolve/" in s.path and s.token]
    cdn = [s for s in fake_hub.seen if s.path.startswith("/cdn/")]
    assert resolves and cdn and not any(s.auth for s in cdn)  # not past the redirect


def test_unknown_repository(fake_hub: FakeHub, cache: Path) -> None:
    code, out = fetch(fake_hub, cache, "org/nothing")
    assert code == 65
    assert "repository org/nothing without a token (the hub says: Repository not found)" in out


def test_corrupt_file_is_never_placed(fake_hub: FakeHub, cache: Path, notify: Notify) -> None:
    fake_hub.add("org/bad", {"b-Q4_K_M.gguf": File(blob(20_000, 5), corrupt=True)})
    code, out = fetch(fake_hub, cache, "org/bad", notify)
    assert code == 65, out
    assert "b-Q4_K_M.gguf does not match the hub's sha256:" in str(notify.statuses()[-1]["error"])
    folder = cache / "models--org--bad"
    assert [p.name for p in folder.rglob("*") if p.is_file() or p.is_symlink()] == []
    assert hfcache.discover(cache) == []


def test_dropped_connection_resumes_with_a_range(fake_hub: FakeHub, cache: Path) -> None:
    data = blob(400_000, 6)
    fake_hub.add("org/flaky", {"f-Q4_K_M.gguf": File(data, drop_at=150_000)})
    code, out = fetch(fake_hub, cache, "org/flaky")
    assert code == 0, out
    gets = fake_hub.gets(hashlib.sha256(data).hexdigest())
    # 150,000 bytes arrived before the drop, or fewer: what arrived is kept.
    assert [g.range is None for g in gets] == [True, False], gets
    assert gets[1].range is not None and int(gets[1].range[6:-1]) > 0
    assert "resuming in" in out
    assert hfcache.discover(cache)[0][1][0].read_bytes() == data


def test_interrupted_download_resumes_where_it_stopped(cache: Path, notify: Notify) -> None:
    data = blob(2_000_000, 7)
    with FakeHub(rate=400_000) as slow:
        slow.add("org/big", {"big-Q4_K_M.gguf": data})
        proc = start(slow, cache, "org/big", notify)
        oid = hashlib.sha256(data).hexdigest()
        part = cache / "models--org--big/blobs" / (oid + hub.PARTIAL)
        rig.wait_for("half the file", lambda: part.exists() and part.stat().st_size > 500_000)
        proc.send_signal(signal.SIGTERM)  # systemctl stop
        proc.communicate(timeout=30)
        kept = part.stat().st_size
        assert 0 < kept < len(data)
        code, out = fetch(slow, cache, "org/big")
        assert code == 0, out
        assert slow.gets(oid)[-1].range == f"bytes={kept}-"
        assert f"resuming at {kept} of {len(data)} bytes" in out
        assert (cache / "models--org--big/blobs" / oid).read_bytes() == data


def test_too_little_disk_space_is_refused_before_any_byte(
        fake_hub: FakeHub, cache: Path) -> None:
    fake_hub.add("org/huge", {"h-Q4_K_M.gguf": File(blob(2000, 8), claimed=2**50)})
    code, out = fetch(fake_hub, cache, "org/huge")
    assert code == 65
    assert f"not enough free disk space in {cache} for org/huge:Q4_K_M: it needs 1024.0 TiB " \
        "more and" in out
    assert not [s for s in fake_hub.seen if s.method == "GET" and "/cdn/" in s.path]


def test_one_file_is_fetched_once_for_two_names(cache: Path, tmp_path: Path) -> None:
    data = blob(1_500_000, 9)
    with FakeHub(rate=1_000_000) as slow:
        slow.add("org/shared", {"s-Q4_K_M.gguf": data})
        first = start(slow, cache, "org/shared")
        second = start(slow, cache, "org/shared:Q4_K_M")
        out1, _ = first.communicate(timeout=60)
        out2, _ = second.communicate(timeout=60)
        assert first.returncode == second.returncode == 0, out1 + out2
        oid = hashlib.sha256(data).hexdigest()
        assert len(slow.gets(oid)) == 1
        assert "another download is fetching it; waiting for it" in out1 + out2
        assert not list(cache.rglob("*" + hub.PARTIAL))


def test_a_waiter_starts_afresh_after_the_other_download_fails_its_hash(
        fake_hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The waiter held the lock of a part file the failed download had deleted: it read back
    # the bad bytes, failed the hash in turn, and unlinked whatever part file was then at
    # that path (a third download's).
    fetch = fetch_module()
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    data = blob(50_000, 45)
    fake_hub.add("org/race", {"r-Q4_K_M.gguf": data})
    http_ = fetch.Http(fake_hub.url, None)
    plan = fetch.make_plan(http_, hub.Name("org/race"))
    first = fetch.Part(cache, plan, plan.files[0])
    first.lock(fetch.Status())
    waiter = threading.Thread(target=fetch.fetch_file,
                              args=(http_, cache, plan, plan.files[0], fetch.Status()))
    waiter.start()
    rig.wait_for("the waiter to open the part file", lambda: any(
        os.path.realpath(f"/proc/self/fd/{fd}") == str(first.path)
        for fd in os.listdir("/proc/self/fd") if int(fd) != first.file.fileno()))
    first.write(b"\0" * len(data))
    with pytest.raises(hub.HubError, match="does not match"):
        first.verify_and_place()
    waiter.join(timeout=60)
    assert not waiter.is_alive()
    assert first.final.read_bytes() == data
    assert not first.path.exists()


def test_split_model_comes_whole(fake_hub: FakeHub, cache: Path) -> None:
    parts = {f"split/m-Q8_0-{n:05d}-of-00003.gguf": blob(3000 + n, 10 + n) for n in (1, 2, 3)}
    fake_hub.add("org/split", {**parts, "split/mmproj-m-Q8_0.gguf": blob(1500, 20),
                               "other/mmproj-x-f16.gguf": blob(1500, 21)})
    code, out = fetch(fake_hub, cache, "org/split:Q8_0")
    assert code == 0, out
    [(model, shards, mmproj)] = hfcache.discover(cache)
    assert model == "org/split:Q8_0" and mmproj is not None
    assert [s.name for s in shards] == [p.split("/")[1] for p in parts]
    assert mmproj.name == "mmproj-m-Q8_0.gguf"
    assert all(s.read_bytes() == parts[f"split/{s.name}"] for s in shards)


def test_a_preset_repository_brings_its_preset_only(fake_hub: FakeHub, cache: Path) -> None:
    fake_hub.add("org/presets", {"preset.ini": b"[a]\nhf-repo = org/model-GGUF\n",
                                 "x-Q4_K_M.gguf": blob(2000, 30)})
    code, out = fetch(fake_hub, cache, "org/presets")
    assert code == 0, out
    commit = fake_hub.repos["org/presets"].commit
    snap = cache / "models--org--presets/snapshots" / commit
    assert sorted(p.name for p in snap.iterdir()) == ["preset.ini"]
    # A small file kept in git: checked against git's SHA-1 of it.
    assert (snap / "preset.ini").read_bytes().startswith(b"[a]")


def test_remove_a_tag_or_the_repository(fake_hub: FakeHub, cache: Path) -> None:
    assert fetch(fake_hub, cache, f"{REPO}:Q4_K_M")[0] == 0
    assert fetch(fake_hub, cache, f"{REPO}:Q8_0")[0] == 0
    assert sorted(m for m, _, _ in hfcache.discover(cache)) == [f"{REPO}:Q4_K_M", f"{REPO}:Q8_0"]
    code, out = fetch(fake_hub, cache, f"{REPO}:Q8_0", None, None, "--remove")
    assert code == 0 and "1 files removed" in out, out
    assert [m for m, _, _ in hfcache.discover(cache)] == [f"{REPO}:Q4_K_M"]
    blobs = cache / "models--org--model-GGUF/blobs"
    assert not (blobs / fake_hub.file(REPO, Q8).oid).exists()  # its blob went too
    assert (blobs / fake_hub.file(REPO, Q4).oid).exists()
    assert fetch(fake_hub, cache, REPO, None, None, "--remove")[0] == 0
    assert not (cache / "models--org--model-GGUF").exists()


def test_a_newer_commit_keeps_older_quantizations_listed(fake_hub: FakeHub, cache: Path) -> None:
    assert fetch(fake_hub, cache, f"{REPO}:Q8_0")[0] == 0
    fake_hub.repos[REPO].commit = "f" * 40  # the repository moved on
    assert fetch(fake_hub, cache, f"{REPO}:Q4_K_M")[0] == 0
    assert sorted(m for m, _, _ in hfcache.discover(cache)) == [f"{REPO}:Q4_K_M", f"{REPO}:Q8_0"]


def test_hub_unreachable_is_worth_retrying(cache: Path) -> None:
    with refused_url() as url:
        proc = subprocess.run([sys.executable, "-m", "llamad.catalog.fetch", "--cache",
                               str(cache), "--endpoint", url, REPO],
                              capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 75
    assert f"cannot reach the hub at {url}/" in proc.stdout


def test_bad_names_are_one_sentence(cache: Path) -> None:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "llamad.catalog.fetch", "--cache", str(cache),
                           "--endpoint", "http://127.0.0.1:9", "--", "../etc"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 65 and time.monotonic() - started < 30
    assert "'../etc' is not a Hugging Face repository name" in proc.stdout


def test_a_listed_size_the_file_does_not_have_fails_at_once(
        fake_hub: FakeHub, cache: Path, notify: Notify) -> None:
    # The tree says 1000 bytes more than the hub sends: resuming past the real end (416)
    # started over and fetched the whole file again, forever.
    data = blob(5000, 40)
    fake_hub.add("org/lies", {"l-Q4_K_M.gguf": File(data, claimed=len(data) + 1000)})
    proc = start(fake_hub, cache, "org/lies", notify)
    try:
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 65, out
    assert "the hub lists l-Q4_K_M.gguf as 6000 bytes but sends 5000" in \
        str(notify.statuses()[-1]["error"])
    assert len(fake_hub.gets(hashlib.sha256(data).hexdigest())) == 1
    assert hfcache.discover(cache) == []


def test_a_file_larger_than_listed_is_refused_before_its_bytes(
        fake_hub: FakeHub, cache: Path) -> None:
    data = blob(5000, 41)
    fake_hub.add("org/short", {"s-Q4_K_M.gguf": File(data, claimed=4000)})
    code, out = fetch(fake_hub, cache, "org/short")
    assert code == 65 and "the hub lists s-Q4_K_M.gguf as 4000 bytes but sends 5000" in out


@pytest.mark.parametrize("body", [b"[" * 200_000, b'{"a": ' * 100_000])
def test_a_deeply_nested_listing_is_one_sentence(fake_hub: FakeHub, cache: Path,
                                                 notify: Notify, body: bytes) -> None:
    # json.loads raises RecursionError, not ValueError, for deep nesting: it crashed the
    # downloader (exit 1, a traceback, and systemd restarting it).
    fake_hub.add("org/nested", {"n-Q4_K_M.gguf": blob(2000, 42)}).tree_body = body
    code, out = fetch(fake_hub, cache, "org/nested", notify)
    assert code == 65, out
    assert "the hub's answer about the file list of org/nested is not JSON" in \
        str(notify.statuses()[-1]["error"])
    assert "Traceback" not in out


@pytest.mark.parametrize("where", ["http://localhost:99999/cdn/x", "http://[::1/cdn/x",
                                   "/cdn/a b"])
def test_a_redirect_to_a_malformed_address_is_one_sentence(
        fake_hub: FakeHub, cache: Path, notify: Notify, where: str) -> None:
    fake_hub.add("org/redirect", {"r-Q4_K_M.gguf": File(blob(2000, 43), location=where)})
    code, out = fetch(fake_hub, cache, "org/redirect", notify)
    assert code == 65, out
    assert "which is not a valid http or https address" in str(notify.statuses()[-1]["error"])
    assert "Traceback" not in out and not notify.ready()


def test_starting_over_is_not_progress(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    # A hub that ends the file early, then refuses to resume it (416) without saying its
    # size: each start over fetched the bytes again and counted as progress, so the
    # downloader never gave up.
    fetch = fetch_module()
    f = hub.RemoteFile("x-Q4_K_M.gguf", 6000, "0" * 64)
    part = fetch.Part(cache, hub.Plan(hub.Name("org/x"), "a" * 40, (f,), "org/x:Q4_K_M"), f)
    calls: list[int] = []

    def transfer(_http: object, _url: str, p: Any, _status: object) -> None:
        calls.append(p.have)
        assert len(calls) < 50, "it never gives up"
        if p.have:
            p.restart()
            raise fetch.Retry("the hub refused to resume; starting over")
        p.write(b"x" * 5000)
        raise fetch.Retry("the connection ended at 5000 of 6000 bytes")

    monkeypatch.setattr(fetch, "transfer", transfer)
    monkeypatch.setattr(fetch.time, "sleep", lambda _s: None)
    try:
        with pytest.raises(fetch.Retry):
            fetch.pull(None, "", part, None)
    finally:
        part.close()
    assert calls == [0, 5000, 0, 5000, 0, 5000][:fetch.RETRIES + 1]


def test_a_disk_that_fills_up_midway_fails_at_once(
        fake_hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The disk is not the network: a write error was retried as a broken transfer (31 s
    # of pauses, then exit 75, a restart, and only then the free-space check's refusal).
    fetch = fetch_module()
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    fake_hub.add("org/full", {"f-Q4_K_M.gguf": blob(20_000, 44)})
    http_ = fetch.Http(fake_hub.url, None)
    plan = fetch.make_plan(http_, hub.Name("org/full"))
    part = fetch.Part(cache, plan, plan.files[0])
    real = part.file

    class Full:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def write(self, _data: bytes) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    part.file = Full()
    try:
        with pytest.raises(hub.HubError, match="No space left on device") as e:
            fetch.transfer(http_, fetch.file_url(http_.endpoint, plan, plan.files[0]), part,
                           fetch.Status())
    finally:
        real.close()
    assert e.value.permanent


def test_a_token_of_two_lines_is_refused_without_printing_it(
        fake_hub: FakeHub, cache: Path) -> None:
    # http.client refuses the header with a ValueError that quotes it: the traceback put
    # the token in the journal.
    token = TOKEN + "\nsecond-line"
    code, out = fetch(fake_hub, cache, REPO, None, token)
    assert code == 65, out
    assert "a header holds characters HTTP does not allow" in out
    assert TOKEN not in out and "Traceback" not in out
