"""Statistics, the targets, the markdown report and the plots."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import rig

from bench import kvswap
from bench.contenders import ARGS, NICE
from bench.sections import SOCKET, SOCKET_SANDBOXED, SWAP, Counts, Results, Series

TITLES = {
    1: "Added latency of a cheap request",
    2: "Streaming a long generation",
    3: "Cold start (model not loaded)",
    4: "Swap (two models, one loaded at a time)",
    5: "Concurrency",
    6: "Footprint",
    7: "Scale",
    8: "A conversation across a swap, KV cache kept by default (bench/kvswap.py)",
}


def p(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile: p(v, 0.99) of 200 samples is the 198th smallest."""
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def p50(s: Series) -> float:
    return p(s.values, 0.5)


def p99(s: Series) -> float:
    return p(s.values, 0.99)


def fmt(x: float) -> str:
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


@dataclass
class Check:
    target: str
    measured: str
    met: bool


def baseline(res: Results, s: Series) -> Series | None:
    """What a series is compared with: direct llama-server, a bare start, or a llamad that
    keeps no KV cache."""
    for name in ("direct", "bare", kvswap.BASE):
        other = res.get(s.section, s.metric, name)
        if other is not None and other is not s:
            return other
    return None


def versus(res: Results, s: Series) -> str:
    base = baseline(res, s)
    if base is None:
        return ""
    ratio = f"{p50(s) / p50(base):.3f}x"
    if s.unit != "ms":
        return ratio
    return (f"{ratio}; {p50(s) - p50(base):+.2f} ms p50, {p99(s) - p99(base):+.2f} ms p99 "
            f"vs {base.contender}")


def checks(res: Results, n: Counts) -> list[Check]:
    """Every target whose section ran, with its verdict (issue #27's, and the earlier ones
    still kept)."""
    ran = {key[0] for key in res.series}

    def s(section: int, metric: str, who: str) -> Series:
        found = res.get(section, metric, who)
        if found is None:
            raise KeyError(f"no result for section {section}, {metric}, {who}")
        return found

    out: list[Check] = []
    if 1 in ran:
        out += _latency(s)
    if 2 in ran:
        ratio = p50(s(2, "tokens/s", "llamad")) / p50(s(2, "tokens/s", "direct"))
        out.append(Check("streaming tokens/s ≥ 0.99x direct", f"{ratio:.3f}x", ratio >= 0.99))
    for section, metric in ((3, "request to first token"), (4, SWAP)):
        if section in ran:
            ll, r = p50(s(section, metric, "llamad")), p50(s(section, metric, "router"))
            out.append(Check(f"{'cold start' if section == 3 else 'swap'} ≤ 0.7x router mode's",
                             f"llamad {ll:.0f} ms, router {r:.0f} ms: {ll / r:.2f}x",
                             ll <= 0.7 * r))
    if 5 in ran:
        metric = f"aggregate tokens/s, {n.clients} streams"
        ratio = p50(s(5, metric, "llamad")) / p50(s(5, metric, "direct"))
        out.append(Check(f"{n.clients} streams ≥ 0.97x direct", f"{ratio:.3f}x",
                         ratio >= 0.97))
    if 6 in ran:
        for label in ("4 models", f"{n.catalog_small} models"):
            rss = p50(s(6, f"idle RSS, {label}", "llamad"))
            out.append(Check(f"idle RSS ≤ 50 MB, {label}", f"{rss:.1f} MB", rss <= 50))
        act, boxed = s(6, SOCKET, "llamad"), res.get(6, SOCKET_SANDBOXED, "llamad")
        within = f" (in the package's sandbox {p50(boxed):.0f} ms p50)" if boxed else ""
        out.append(Check("socket-activated first answer ≤ 200 ms",
                         f"{p50(act):.0f} ms p50, {max(act.values):.0f} ms max{within}",
                         p50(act) <= 200))
    if 7 in ran:
        listing = s(7, f"GET /v1/models, {n.catalog_large} models", "llamad")
        out.append(Check(f"GET /v1/models with {n.catalog_large} models ≤ 50 ms",
                         f"{p50(listing):.1f} ms p50, {p99(listing):.1f} ms p99",
                         p50(listing) <= 50))
    if 8 in ran:
        out += _kv(s, res)
    return out


def _latency(s: Any) -> list[Check]:
    out = []
    ll, d, r = (s(1, "/tokenize", w) for w in ("llamad", "direct", "router"))
    a50, a99 = p50(ll) - p50(d), p99(ll) - p99(d)
    r50, r99 = p50(r) - p50(d), p99(r) - p99(d)
    out.append(Check("/tokenize: added p50 and p99 ≤ router mode's",
                     f"llamad {a50:+.2f} / {a99:+.2f} ms; router {r50:+.2f} / {r99:+.2f} ms",
                     a50 <= r50 and a99 <= r99))
    ll, d, r = (s(1, "1-token completion", w) for w in ("llamad", "direct", "router"))
    a50, r50 = p50(ll) - p50(d), p50(r) - p50(d)
    out.append(Check("1-token completion: added p50 ≤ 1 ms",
                     f"llamad {a50:+.2f} ms (p99 {p99(ll) - p99(d):+.2f}); router {r50:+.2f} ms",
                     a50 <= 1))
    return out


def _kv(s: Any, res: Results) -> list[Check]:
    kept, prefill = p50(s(8, kvswap.TTFT, "llamad")), p50(s(8, kvswap.TTFT, kvswap.BASE))
    swap = p50(s(8, kvswap.SWAP_OUT, kvswap.BASE))
    saves = res.get(8, kvswap.SAVE, "llamad")
    save = p50(saves) if saves is not None else None
    return [
        Check("swap-back time to first token ≤ 0.05x re-prefill (2k tokens, defaults)",
              f"{kept:.0f} ms vs {prefill:.0f} ms: {kept / prefill:.3f}x",
              kept <= 0.05 * prefill),
        Check("saving ≤ 5% of a swap",
              f"the save {save:.0f} ms = {save / swap:.1%} of a swap without it ({swap:.0f} ms)"
              if save is not None else "nothing was saved",
              save is not None and save <= 0.05 * swap),
    ]


# -- the run recorded before -----------------------------------------------------------

@dataclass
class Previous:
    res: Results
    info: dict[str, str]


def load(path: Path) -> Previous | None:
    """The run recorded in `path` (benchmarks.json): a list of series, or since issue #27
    {"info": ..., "series": [...]}; None where there is none."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    rows = raw.get("series", []) if isinstance(raw, dict) else raw
    res = Results()
    for row in rows:
        try:
            series = Series(**row)
        except TypeError:
            continue
        res.series[(series.section, series.metric, series.contender)] = series
    return Previous(res, raw.get("info", {}) if isinstance(raw, dict) else {})


def _then(prev: Previous | None, n: Counts) -> dict[str, Check]:
    if prev is None:
        return {}
    try:
        return {c.target: c for c in checks(prev.res, n)}
    except KeyError:  # a section it ran only in part
        return {}


def _when(prev: Previous | None) -> str:
    if prev is None:
        return "none recorded"
    info = prev.info
    return f"{info.get('Date', 'undated')}, {info.get('llamad', 'commit unknown')}"


def against(res: Results, n: Counts, prev: Previous | None) -> str:
    """Each target, now and in the run recorded before: what `make bench` prints last."""
    then = _then(prev, n)
    lines = [f"Targets against the run recorded before ({_when(prev)}):"]
    for c in checks(res, n):
        old = then.get(c.target)
        mark = "REGRESSED " if old is not None and old.met and not c.met else ""
        lines.append(f"  {mark}{'met' if c.met else 'MISSED'}: {c.target}: {c.measured}"
                     f"  (before: {old.measured if old else '-'})")
    return "\n".join(lines)


def _cmd(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except OSError:
        return "?"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) \
        else "?"


def machine() -> dict[str, str]:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal:"))
    osname = next((line.split("=", 1)[1].strip('"') for line in
                   Path("/etc/os-release").read_text().splitlines()
                   if line.startswith("PRETTY_NAME=")), "?")
    root = Path(__file__).resolve().parent.parent
    commit = _cmd(["git", "-C", str(root), "rev-parse", "--short", "HEAD"])
    dirty = _cmd(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"])
    from llamad import __version__
    return {
        "Date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "CPU": f"{cpu}, {os.cpu_count()} logical CPUs",
        "Memory": f"{mem / 1024 / 1024:.1f} GiB",
        "OS": f"{osname}, Linux {platform.release()}",
        "systemd": _cmd(["systemctl", "--version"]),
        "llama-server": f"{_cmd([str(rig.LLAMA_SERVER), '--version'])} "
                        f"({rig.LLAMA_SERVER.parent.name})",
        "Model": f"{rig.GEMMA.name} ({rig.GEMMA.stat().st_size / 1e6:.0f} MB)",
        "llamad": f"{__version__}, commit {commit}" + (" with local changes" if dirty != "?" and
                                                      dirty else ""),
        "Python / aiohttp": f"{platform.python_version()} / {aiohttp.__version__}",
    }


def markdown(res: Results, n: Counts, info: dict[str, str], quick: bool,
             plots: list[str], seconds: float, prev: Previous | None = None) -> str:
    lines = ["# Benchmarks", "",
             "Produced by `make bench` (`.venv/bin/python -m bench`); do not edit by hand. "
             "All contenders run in one throwaway systemd box on this machine, with the same "
             "llama-server binary, the same model file (hard links) and the same arguments "
             f"(`{' '.join(ARGS)}`). They take turns request by request, in rotated order, so "
             "drift of the machine falls on all alike. Clients are on 127.0.0.1. The box and "
             f"the client run at nice {NICE}: the machine is shared with other jobs.", "",
             "- **llamad**: `llamad serve` as a Type=notify unit, `models-max = 1`, "
             "default UNIX-socket backend, each model a transient `llama-server@` unit "
             "(the package's sandbox only where a row says so: units/llamad.service's);",
             "- **direct**: one llama-server started by hand (transient unit), spoken to "
             "directly;",
             "- **router**: llama.cpp router mode, `llama-server --models-dir DIR "
             "--models-max 1`;",
             "- **bare**: a llama-server process spawned from nothing, /health polled "
             "every 5 ms, then the request (cold start floor);",
             f"- **{kvswap.BASE}** (section 8): a llamad with kv-cache = no, beside one with "
             "the default settings.", ""]
    if quick:
        lines += ["**Quick mode** (`--quick`): tiny counts, numbers are not meaningful.", ""]
    lines += ["| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in info.items()]
    lines += [f"| Run | {seconds / 60:.1f} min; {n.latency} requests per contender and kind, "
              f"{n.stream_rounds} x {n.stream_tokens}-token streams, {n.cold_rounds} cold starts, "
              f"{n.swap_rounds} swaps, {n.parallel_rounds} x {n.clients} parallel streams |", ""]
    then = _then(prev, n)
    lines += ["## Targets", "", f"Beside each, the run recorded before ({_when(prev)}).", "",
              "| Target | Measured | Met | Before |", "|---|---|---|---|"]
    lines += [f"| {c.target} | {c.measured} | {'yes' if c.met else '**no**'} | "
              f"{_before(then.get(c.target), c)} |" for c in checks(res, n)]
    lines += ["", "## Results", "",
              "p50 and p99 are nearest-rank percentiles; *vs baseline* compares p50s with "
              "direct llama-server (bare start for cold start) and, for times, gives the "
              "added milliseconds at p50 and p99.", ""]
    for section, title in TITLES.items():
        rows = [s for s in res.series.values() if s.section == section]
        lines += [f"### {section}. {title}", "",
                  "| Metric | Contender | n | p50 | p99 | min - max | vs baseline |",
                  "|---|---|---|---|---|---|---|"]
        for s in rows:
            u = s.unit
            lines.append(f"| {s.metric} | {s.contender} | {len(s.values)} | {fmt(p50(s))} {u} "
                         f"| {fmt(p99(s))} {u} | {fmt(min(s.values))} - {fmt(max(s.values))} {u} "
                         f"| {versus(res, s)} |")
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in plots] + [""]
    if res.notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in res.notes] + [""]
    if BODIES.exists() and not quick:
        lines += [BODIES.read_text()]
    if ANALYSIS.exists() and not quick:
        lines += [ANALYSIS.read_text()]
    if GPU.exists() and not quick:
        lines += [GPU.read_text()]
    lines += [f.read_text() for f in MULTIHOST if f.exists() and not quick]
    return "\n".join(lines)


def _before(old: Check | None, now: Check) -> str:
    if old is None:
        return "-"
    verdict = "met" if old.met else "missed"
    return f"{old.measured} ({verdict}{'; **regressed**' if old.met and not now.met else ''})"


# Hand-written: what was profiled for each missed target, and the fixes; appended as is.
ANALYSIS = Path(__file__).with_name("analysis.md")
# Written by bench/bodies.py (a run of its own); appended as is.
BODIES = Path(__file__).with_name("bodies.md")
# Hand-written: what has and has not run on a GPU, and how to re-check it (bench/gpu_check).
GPU = Path(__file__).with_name("gpu.md")
# Written by bench/multihost.py (runs of their own: RPC workers, HAProxy); appended as is.
MULTIHOST = (Path(__file__).with_name("rpc.md"), Path(__file__).with_name("haproxy.md"))

COLORS = {"llamad": "tab:blue", "direct": "tab:green", "router": "tab:orange",
          "bare": "tab:gray"}


def plot(res: Results, outdir: Path) -> list[str]:
    """A few PNGs next to the report; returns their file names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []

    def ecdf(ax, section: int, metric: str, xlabel: str) -> None:  # type: ignore[no-untyped-def]
        for s in res.series.values():
            if s.section == section and s.metric == metric:
                v = sorted(s.values)
                ax.step(v, [(i + 1) / len(v) for i in range(len(v))], where="post",
                        label=s.contender, color=COLORS.get(s.contender))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("fraction of requests ≤ x")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ecdf(axes[0], 1, "/tokenize", "ms")
    ecdf(axes[1], 1, "1-token completion", "ms")
    ecdf(axes[2], 2, "inter-chunk delay", "ms")
    axes[1].set_xscale("log")  # a few slow outliers would squash the rest
    axes[2].set_xscale("log")
    fig.tight_layout()
    fig.savefig(outdir / "bench-latency.png", dpi=90)
    plt.close(fig)
    made.append("bench-latency.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, section in zip(axes, (3, 4), strict=True):
        series = [s for s in res.series.values() if s.section == section]
        for i, s in enumerate(series):
            ax.scatter([i] * len(s.values), s.values, color=COLORS.get(s.contender), alpha=0.7)
            ax.hlines(p50(s), i - 0.25, i + 0.25, color="black")
        ax.set_xticks(range(len(series)), [s.contender for s in series])
        ax.set_ylabel("ms")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{section}. {TITLES[section]}")
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(outdir / "bench-startup.png", dpi=90)
    plt.close(fig)
    made.append("bench-startup.png")
    return made
