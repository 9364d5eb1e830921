"""The reference for the single-model files: each case's outcome against llama-server itself.

The single-model files' expectations are written for the stories260K test models (exact
texts, token counts, a BOS id of 1); offline, the cache can only give them the Gemma
file. So run.py tells a llamad fault from a stories260K expectation by what the pinned
llama-server (started directly by the suite, not as a router) does with the same case,
the same offline cache, the same Gemma file and the same plugin. That outcome is
recorded here once, in reference.json, since it depends only on the pinned binary, the
model and the upstream files (all cached by `make dev`). Regenerate it when any of them
changes; cases named on the command line (files or file::test ids) are run and updated,
the others kept. The router file (unit/test_router.py) run the same way is llama-server's
router mode, the comparison docs/conformance.md gives for it:

    python tests/conformance/reference.py [--out tests/conformance/reference.json] [CASE ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import suite
from suite import rig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=suite.HERE / "reference.json")
    parser.add_argument("cases", nargs="*", default=list(suite.SINGLE_FILES))
    args = parser.parse_args()
    for path in (rig.LLAMA_SERVER, rig.GEMMA, suite.UPSTREAM):
        if not path.exists():
            print(f"reference: {path} is missing; run `make dev` first", file=sys.stderr)
            return 1
    work = Path(tempfile.mkdtemp(prefix="llamad-conformance-reference-", dir="/var/tmp"))
    try:
        tests, cache = suite.stage(work, rig.GEMMA)
        with suite.fake_hub(work) as hub:  # what the router file downloads, on loopback
            results, minutes = suite.run_pytest(tests, cache, rig.LLAMA_SERVER, args.cases, (),
                                                {"MODEL_ENDPOINT": hub.url})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    old = json.loads(args.out.read_text()) if args.out.exists() else {"cases": {}}
    cases = {**old["cases"], **{r.test: {"outcome": r.outcome, "why": r.why} for r in results
                                if r.outcome != "not run"}}
    args.out.write_text(json.dumps({
        "about": "Each case of the single-model files run against the pinned llama-server "
                 "itself (not as a router) on the Gemma file, and of the router file against "
                 "its router mode, with the fake hub on loopback for what it downloads; "
                 "written by tests/conformance/reference.py, read by run.py.",
        "llama_server": str(rig.LLAMA_SERVER.relative_to(rig.CACHE)),
        "model": rig.GEMMA.name,
        "cases": dict(sorted(cases.items())),
    }, indent=1, ensure_ascii=False) + "\n")
    counts = {k: sum(r.outcome == k for r in results) for k in ("pass", "fail", "skipped")}
    print(f"reference: {counts} in {minutes:.1f} minutes; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
