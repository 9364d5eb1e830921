"""The dashboard's script (llamad/api/static/dashboard.js) reading an event stream, run in
Node with its own fetch machinery (WHATWG streams, `Response`); the page's DOM is stubbed,
since only readEvents runs here (tests/integration/test_browser.py drives the whole page in
chromium)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).parents[1] / "llamad" / "api" / "static" / "dashboard.js"
NODE = shutil.which("node")

# Loads dashboard.js into a context of its own, answers its fetch with `CHUNKS` and then
# holds the stream open (as a live feed does), and reports what readEvents gave the page
# and whether the stream was let go of.
HARNESS = """
const vm = require("vm");
const [script, chunks, failOn] = JSON.parse(process.argv[1]);
const store = { getItem: () => null, setItem() {}, removeItem() {} };
let cancelled = false;
const ctx = {
  localStorage: store, sessionStorage: store, TextDecoder, Promise, JSON, Error,
  document: { addEventListener() {}, querySelector: () => ({}) },
  fetch: async () => new Response(new ReadableStream({
    start(c) { for (const s of chunks) c.enqueue(new TextEncoder().encode(s)); },
    cancel() { cancelled = true; },
  })),
};
vm.createContext(ctx);
vm.runInContext(require("fs").readFileSync(script, "utf8"), ctx);
const seen = [];
const done = ctx.readEvents("logs/stream/m", (ev) => {
  seen.push(ev);
  if (ev.data === failOn) throw new Error("the page could not take it");
});
const report = (error) => {
  console.log(JSON.stringify({ seen, error, cancelled }));
  process.exit(0);
};
done.then(() => report(null), (e) => report(e.message));
// No timer is waited on: the chunks are all queued, so a stream still read once the
// event loop has turned is one that stays open.
setImmediate(() => setImmediate(() => report("still reading")));
"""


def read_events(chunks: list[str], fail_on: str | None = None) -> dict[str, Any]:
    assert NODE is not None, "node is not installed (make dev installs it, for the web UI)"
    out = subprocess.run([NODE, "-e", HARNESS, json.dumps([str(SCRIPT), chunks, fail_on])],
                         capture_output=True, text=True, timeout=30, check=True)
    result: dict[str, Any] = json.loads(out.stdout.splitlines()[0])
    return result


def test_a_keep_alive_comment_is_no_event() -> None:
    """logstream.py sends `: keep-alive` on a quiet journal; as in EventSource, a block
    without data dispatches nothing (the journal's handler would parse "" and fail)."""
    got = read_events([": keep-alive\n\n", 'id: 7\ndata: {"message": "hi"}\n\n'])
    assert got["error"] == "still reading"  # the feed stays open, nothing thrown
    assert [(e["id"], e["data"]) for e in got["seen"]] == [("7", '{"message": "hi"}')]


def test_a_stream_the_page_gives_up_on_is_let_go() -> None:
    """When the page's handler throws, the stream is cancelled: else the connection stays
    open (held against max-streams) while the page reconnects beside it."""
    got = read_events(['data: {"a": 1}\n\n', "data: boom\n\n"], fail_on="boom")
    assert got["error"] == "the page could not take it" and got["cancelled"]
