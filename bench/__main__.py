"""`make bench`: boot the box, run every section, write docs/benchmarks.md and plots.

    .venv/bin/python -m bench [--quick] [--out FILE] [--only 1,2,...]

A full run takes about 15 minutes on a 2-core machine; --quick runs every
section with tiny counts (for the smoke test), and writes nothing under docs/
unless --out says so. Each target is printed beside its figure in the run recorded
before (docs/benchmarks.json, or FILE's .json).
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from bench import ROOT, kvswap, report, sections
from bench.contenders import contenders

# Sections needing the model loaded in llamad run before the ones that unload it;
# the footprint, scale and KV sections start other llamads, so llamad's own models go first.
ORDER = (1, 2, 5, 3, 4, 6, 7, 8)
RUN = {1: sections.latency, 2: sections.streaming, 3: sections.cold_start, 4: sections.swap,
       5: sections.concurrency, 6: sections.footprint, 7: sections.scale, 8: kvswap.section}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny counts: a smoke run")
    ap.add_argument("--out", type=Path, help="markdown report (default docs/benchmarks.md; "
                    "with --quick, nothing is written unless given)")
    ap.add_argument("--only", help="comma-separated section numbers, e.g. 1,5 (a partial "
                    "report: targets of skipped sections are left out)")
    opts = ap.parse_args(argv)
    wanted = {int(x) for x in opts.only.split(",")} if opts.only else set(ORDER)
    counts = sections.QUICK if opts.quick else sections.Counts()
    out = opts.out or (None if opts.quick else ROOT / "docs" / "benchmarks.md")
    res = sections.Results()
    # As the package's install does (py3compile): a start in the box cannot write bytecode,
    # so a module changed since its last run was compiled again at every socket activation
    # (20 such modules: tens of ms).
    compileall.compile_dir(ROOT / "llamad", quiet=1)
    started = time.monotonic()
    info = report.machine()
    load_at_start = os.getloadavg()[0]
    # The last recorded run, read before this one replaces it: each target is printed
    # beside its figure there, so that a regression shows in the change that made it.
    previous = report.load(out.with_suffix(".json")) if out else None
    with contenders() as setup:
        stopped = False
        for number in (n for n in ORDER if n in wanted):
            if number >= 6 and not stopped:
                # Stop llamad's own models: the other llamads adopt or stop units they find.
                setup.llamad.cleanup()
                stopped = True
            RUN[number](setup, counts, res)
    seconds = time.monotonic() - started
    info["Load average"] = f"{load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
    plots = report.plot(res, out.parent) if out else []
    text = report.markdown(res, counts, info, opts.quick, plots, seconds, previous)
    if out:
        out.write_text(text)
        raw = out.with_suffix(".json")
        raw.write_text(json.dumps({"info": info, "series": [
            asdict(s) for s in res.series.values()]}, indent=1))
        print(f"wrote {out}, {raw.name} and {', '.join(plots)}")
    print(text)
    print(report.against(res, counts, previous))
    return 0


if __name__ == "__main__":
    sys.exit(main())
