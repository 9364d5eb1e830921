"""The hub's protocol, pure: names, the hub's JSON checked field by field, which files a name
means (as llama.cpp's -hf picks them), and the download units' properties."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamad.catalog import hub
from llamad.catalog.hub import HubError, Name, RemoteFile
from llamad.systemd import downloadunit as du

SHA = "a" * 64


@pytest.mark.parametrize(("text", "want"), [
    ("user/repo", Name("user/repo")),
    ("user/repo:Q4_K_M", Name("user/repo", "Q4_K_M")),
    ("hf.co/user/repo:q8_0", Name("user/repo", "q8_0")),
    ("https://huggingface.co/user/re.po-x_1:latest", Name("user/re.po-x_1")),
    ("huggingface.co/user/repo", Name("user/repo")),
])
def test_names(text: str, want: Name) -> None:
    assert hub.parse_name(text) == want


@pytest.mark.parametrize("text", ["gemma3", "a/b/c", "../x", "user/../x", "-rf/x", "u/r:-x",
                                  "u/r:Q4 K", "user/re\npo", "", None, 5, "u/" + "r" * 300])
def test_bad_names(text: object) -> None:
    with pytest.raises(HubError):
        hub.parse_name(text)


def test_endpoint_as_llama_cpp_reads_it() -> None:
    assert hub.endpoint("", {}) == "https://huggingface.co/"
    assert hub.endpoint("", {"HF_ENDPOINT": "http://h"}) == "http://h/"
    assert hub.endpoint("", {"HF_ENDPOINT": "http://h", "MODEL_ENDPOINT": "http://m/"}) == \
        "http://m/"
    assert hub.endpoint("http://conf", {"MODEL_ENDPOINT": "http://m/"}) == "http://conf/"


def test_refs_prefer_main() -> None:
    data = {"branches": [{"name": "dev", "targetCommit": "1" * 40},
                         {"name": "main", "targetCommit": "2" * 40},
                         {"name": "bad", "targetCommit": "zz"}]}
    assert hub.parse_refs(data, "u/r") == "2" * 40
    with pytest.raises(HubError, match="no branch"):
        hub.parse_refs({"branches": [{"name": "main", "targetCommit": "../x"}]}, "u/r")


def test_tree_keeps_only_safe_plain_files() -> None:
    lfs = {"oid": SHA, "size": 7}
    tree = [
        {"type": "file", "path": "ok-Q4_K_M.gguf", "size": 1, "oid": "b" * 40, "lfs": lfs},
        {"type": "file", "path": "small.ini", "size": 3, "oid": "c" * 40},
        {"type": "directory", "path": "sub", "oid": "d" * 40},
        {"type": "file", "path": "../escape.gguf", "size": 1, "oid": "c" * 40},
        {"type": "file", "path": "/abs.gguf", "size": 1, "oid": "c" * 40},
        {"type": "file", "path": "a/./b.gguf", "size": 1, "oid": "c" * 40},
        {"type": "file", "path": "nl\n.gguf", "size": 1, "oid": "c" * 40},
        {"type": "file", "path": "neg.gguf", "size": -1, "oid": "c" * 40},
        {"type": "file", "path": "bool.gguf", "size": True, "oid": "c" * 40},
        {"type": "file", "path": "oid.gguf", "size": 1, "oid": "C" * 40},
        "junk",
    ]
    assert hub.parse_tree(tree, "u/r") == [RemoteFile("ok-Q4_K_M.gguf", 7, SHA),
                                           RemoteFile("small.ini", 3, "c" * 40)]
    with pytest.raises(HubError):
        hub.parse_tree({"error": "x"}, "u/r")


def files(*paths: str) -> list[RemoteFile]:
    return [RemoteFile(p, 10, f"{n:064x}") for n, p in enumerate(paths)]


def test_choice_follows_llama_cpp() -> None:
    repo = files("README.md", "m-F16.gguf", "m-Q8_0.gguf", "m-Q4_K_M.gguf",
                 "mmproj-m-F16.gguf", "m-imatrix.gguf")
    plan = hub.choose(Name("u/r"), "c" * 40, repo)  # no tag: Q4_K_M first
    assert plan.model == "u/r:Q4_K_M" and [f.path for f in plan.files] == \
        ["m-Q4_K_M.gguf", "mmproj-m-F16.gguf"]
    assert hub.choose(Name("u/r", "f16"), "c" * 40, repo).model == "u/r:F16"
    with pytest.raises(HubError, match=r"has no Q5_K_S model file; it has: m-F16\.gguf"):
        hub.choose(Name("u/r", "Q5_K_S"), "c" * 40, repo)
    only = hub.choose(Name("u/r"), "c" * 40, files("x-BF16.gguf"))  # the first model file
    assert only.model == "u/r:BF16"
    with pytest.raises(HubError, match="no quantization in its name"):
        hub.choose(Name("u/r"), "c" * 40, files("model.gguf"))
    preset = hub.choose(Name("u/r"), "c" * 40, files("m-Q4_K_M.gguf", "preset.ini"))
    assert preset.preset and [f.path for f in preset.files] == ["preset.ini"]


def test_split_model_needs_every_part() -> None:
    parts = [f"d/m-Q8_0-{n:05d}-of-00003.gguf" for n in (2, 1, 3)]
    plan = hub.choose(Name("u/r", "Q8_0"), "c" * 40, files(*parts, "mmproj-top-f16.gguf"))
    assert [f.path for f in plan.files] == [*sorted(parts), "mmproj-top-f16.gguf"]
    with pytest.raises(HubError, match="lacks part 3"):
        hub.choose(Name("u/r", "Q8_0"), "c" * 40, files(*parts[:2]))


def test_download_unit_is_sandboxed_and_keeps_the_token_out_of_sight() -> None:
    command = du.argv("/usr/bin/python3", Path("/var/lib/llamad/hub"), "https://h/", "u/r:Q4_0")
    assert command[-2:] == ["--", "u/r:Q4_0"]  # never a flag
    props = {name: value for name, _, value in du.properties(
        "u/r:Q4_0", command, Path("/var/lib/llamad/hub"), Path("/etc/llamad/hf-token"))}
    assert props["ReadWritePaths"] == ["/var/lib/llamad/hub"]
    assert props["ProtectSystem"] == "strict" and props["CapabilityBoundingSet"] == 0
    assert props["LoadCredential"] == [("hf-token", "/etc/llamad/hf-token")]
    assert props["Type"] == "notify" and props["RemainAfterExit"] is True
    assert props["RestartPreventExitStatus"] == ([65], [])
    assert "DynamicUser" not in props and "User" not in props  # root, without capabilities
    # llamad's python and code: where PrivateTmp= hides them (a clone in /var/tmp), bound in.
    for code, bound in (((Path("/usr"), Path("/usr/lib/python3/dist-packages")), None),
                        ((Path("/var/tmp/x/.venv"), Path("/usr/lib/x")),
                         [("/var/tmp/x/.venv", "/var/tmp/x/.venv", False, 0)])):
        got = {name: value for name, _, value in du.properties(
            "u/r", command, Path("/c"), None, code=code)}
        assert got.get("BindReadOnlyPaths") == bound
    shown = repr(props["ExecStart"]) + repr(props["Environment"])
    assert "hf-token" not in shown
    assert du.download_unit("u/r:Q4_0") == "llamad-download@u-r:Q4_0-" + \
        du.download_unit("u/r:Q4_0").rsplit("-", 1)[1]
    removal = {name: value for name, _, value in du.properties(
        "u/r:Q4_0", du.argv("p", Path("/c"), "", "u/r:Q4_0", remove=True), Path("/c"), None,
        remove=True)}
    assert removal["PrivateNetwork"] is True and "LoadCredential" not in removal
