// llamad's dashboard: a live table of the models, fed by GET /dashboard/events.
// Plain JavaScript, no build step. Streams are read with fetch() rather than EventSource
// so that an API key can be sent with them.
"use strict";

// The key lives in this tab's sessionStorage: a script on llamad's origin in another tab
// (the chat UI renders model output) cannot read it, and it is gone with the tab. Earlier
// versions kept it in localStorage: removed from there.
const KEY_STORE = "llamad.api-key";
localStorage.removeItem(KEY_STORE);
const MiB = 1024 * 1024;
const models = new Map(); // id -> {entry, row, ttlUntil}
let machine = null;
let journal = null; // {model, abort, lastId}
let retryNow = () => {}; // ends the wait before the feed reconnects

const $ = (sel) => document.querySelector(sel);

function headers(extra = {}) {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  return n >= 1024 * MiB ? `${(n / 1024 / MiB).toFixed(2)} GiB` : `${(n / MiB).toFixed(0)} MiB`;
}

function seconds(s) {
  if (s === null || s === undefined) return "–";
  s = Math.max(0, Math.round(s));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h ${String(Math.floor(s / 60) % 60).padStart(2, "0")}m`;
}

function say(text, error = false) {
  const box = $("#message");
  box.textContent = text;
  box.classList.toggle("error", error);
  box.hidden = !text;
}

function modelPath(id) {
  return id.split("/").map(encodeURIComponent).join("/");
}

// -- server-sent events over fetch ---------------------------------------------

async function readEvents(url, onEvent, signal, lastId) {
  const extra = lastId ? { "Last-Event-ID": lastId } : {};
  const resp = await fetch(url, { headers: headers(extra), signal, cache: "no-store" });
  if (resp.status === 401) {
    $("#keyform").hidden = false;
    throw new Error("an API key is needed");
  }
  if (!resp.ok) {
    let text = `${resp.status} ${resp.statusText}`;
    try { text = (await resp.json()).error.message; } catch (e) { /* not JSON */ }
    const err = new Error(text);
    err.status = resp.status;
    throw err;
  }
  const reader = resp.body.getReader();
  try {
    await dispatch(reader, onEvent);
  } finally {
    // Whatever ended the reading (the page's handler threw, say), let the stream go: an
    // unread response holds its connection, and a place of max-streams, open.
    reader.cancel().catch(() => {});
  }
}

async function dispatch(reader, onEvent) {
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const ev = parseBlock(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
      if (ev.data !== null) onEvent(ev);
    }
  }
}

// One event's lines; data is null for a block without any (a comment such as logstream's
// `: keep-alive`), which EventSource would not dispatch either.
function parseBlock(block) {
  const ev = { event: "message", data: null, id: null };
  for (const line of block.split("\n")) {
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") ev.event = val;
    else if (field === "data") ev.data = ev.data === null ? val : `${ev.data}\n${val}`;
    else if (field === "id") ev.id = val;
  }
  return ev;
}

// -- the model table -------------------------------------------------------------

const FIELDS = ["model", "state", "unit", "placement", "memory", "requests", "ttl", "pinned",
                "actions"];

function makeRow(id) {
  const row = document.createElement("tr");
  row.dataset.model = id;
  for (const f of FIELDS) {
    const td = document.createElement("td");
    td.dataset.f = f;
    row.appendChild(td);
  }
  const actions = row.querySelector("[data-f=actions]");
  for (const [action, label] of [["load", "Load"], ["unload", "Unload"], ["pin", "Pin"],
                                 ["journal", "Journal"]]) {
    const b = document.createElement("button");
    b.type = "button";
    b.dataset.action = action;
    b.textContent = label;
    b.addEventListener("click", () => act(action, id));
    actions.appendChild(b);
  }
  return row;
}

function memoryCell(e) {
  const lines = [["RAM", e.ram, e.estimate.ram, e.peak.ram, "ram"]];
  if (machine && machine.gpus.length) {
    lines.push(["VRAM", e.vram, e.estimate.vram, e.peak.vram, "vram"]);
  }
  const frag = document.createDocumentFragment();
  for (const [label, used, est, peak, cls] of lines) {
    const scale = Math.max(used || 0, est || 0, peak || 0, 1) * 1.1;
    const name = document.createElement("span");
    name.textContent = label;
    const bar = document.createElement("div");
    bar.className = `bar ${cls}`;
    bar.innerHTML = `<span class="fill"></span><span class="mark"></span>`;
    bar.firstChild.style.width = `${((used || 0) / scale) * 100}%`;
    bar.lastChild.style.left = `${((est || 0) / scale) * 100}%`;
    bar.title = `measured ${bytes(used)}, peak ${bytes(peak)}, estimate ${bytes(est)}`;
    const fig = document.createElement("span");
    fig.className = "fig";
    fig.dataset.kind = cls;
    fig.textContent = `${bytes(used)} of est. ${bytes(est)}`;
    frag.append(name, bar, fig);
  }
  const box = document.createElement("div");
  box.className = "mem";
  box.appendChild(frag);
  return box;
}

function fill(row, e) {
  const cell = (f) => row.querySelector(`[data-f=${f}]`);
  row.dataset.state = e.state;
  const aliases = e.aliases.length ? `<div class="aliases"></div>` : "";
  cell("model").innerHTML = `<strong></strong>${aliases}`;
  cell("model").firstChild.textContent = e.id;
  if (aliases) cell("model").lastChild.textContent = `aliases: ${e.aliases.join(", ")}`;
  cell("state").innerHTML = `<span class="state"></span>`;
  cell("state").firstChild.textContent = e.state;
  cell("state").firstChild.classList.add(e.state);
  if (e.reason) {
    const r = document.createElement("div");
    r.className = "reason";
    r.textContent = e.reason;
    cell("state").appendChild(r);
  }
  cell("unit").innerHTML = `<div></div><div class="pid"></div>`;
  cell("unit").firstChild.textContent = e.unit;
  cell("unit").lastChild.textContent = e.main_pid ? `PID ${e.main_pid}` : "";
  cell("placement").textContent = placement(e);
  if (e.fit && e.fit.reason) {  // what llamad fitted the model to, and why
    const f = document.createElement("div");
    f.className = "reason fit";
    f.textContent = e.fit.reason;
    cell("placement").appendChild(f);
  }
  cell("memory").replaceChildren(memoryCell(e));
  cell("requests").innerHTML = `<div></div><div class="sub"></div>`;
  cell("requests").firstChild.textContent = `${e.served} served`;
  cell("requests").lastChild.textContent = `${e.in_flight} in flight, ${e.queued} queued`;
  cell("pinned").textContent = e.pinned ? "pinned" : "–";
  row.querySelector("[data-action=load]").disabled = !["unloaded", "failed"].includes(e.state);
  row.querySelector("[data-action=unload]").disabled = ["unloaded", "stopping"].includes(e.state);
  row.querySelector("[data-action=pin]").textContent = e.pinned ? "Unpin" : "Pin";
}

function placement(e) {
  if (e.state === "unloaded") return "–";
  if (!e.gpus.length) return "CPU";
  const names = machine ? new Map(machine.gpus.map((g) => [g.index, g.name])) : new Map();
  return e.gpus.map((i) => `GPU ${i}${names.has(i) ? ` (${names.get(i)})` : ""}`).join(", ");
}

function rank(e) {
  return e.state === "unloaded" ? 1 : 0;
}

function upsert(e) {
  let m = models.get(e.id);
  if (!m) {
    m = { row: makeRow(e.id) };
    models.set(e.id, m);
  }
  m.entry = e;
  m.ttlUntil = e.ttl_left === null ? null : performance.now() / 1000 + e.ttl_left;
  fill(m.row, e);
  showTtl(m);
}

function remove(id) {
  const m = models.get(id);
  if (m) m.row.remove();
  models.delete(id);
}

function order() {
  const body = $("#models tbody");
  const ids = [...models.keys()].sort((a, b) => {
    const ea = models.get(a).entry, eb = models.get(b).entry;
    return rank(ea) - rank(eb) || a.localeCompare(b);
  });
  const now = [...body.children].map((r) => r.dataset.model);
  if (ids.length === now.length && ids.every((id, i) => id === now[i])) return;
  for (const id of ids) body.appendChild(models.get(id).row);
}

function showTtl(m) {
  const left = m.ttlUntil === null ? null : m.ttlUntil - performance.now() / 1000;
  m.row.querySelector("[data-f=ttl]").textContent = seconds(left);
}

function showMachine(mc) {
  machine = mc;
  $("#status").textContent = mc.status;
  const box = $("#machine");
  box.replaceChildren();
  const modelsRam = [...models.values()].reduce((s, m) => s + (m.entry.ram || 0), 0);
  if (mc.ram.total) {
    const used = mc.ram.total - mc.ram.available;
    box.appendChild(device("RAM", mc.ram.total, Math.min(modelsRam, used), used,
      `${bytes(used)} used of ${bytes(mc.ram.total)}, ${bytes(modelsRam)} by models`, "ram"));
  }
  for (const g of mc.gpus) {
    const byModels = [...models.values()].reduce((s, m) => s + (m.entry.gpus.includes(g.index)
      ? (m.entry.vram || 0) / m.entry.gpus.length : 0), 0);
    box.appendChild(device(`GPU ${g.index}: ${g.name}`, g.total, Math.min(byModels, g.used),
      g.used, `${bytes(g.used)} used of ${bytes(g.total)}, ${bytes(byModels)} by models`,
      "vram"));
  }
}

function device(label, total, byModels, used, text, cls) {
  const d = document.createElement("div");
  d.className = "dev";
  d.dataset.device = cls;
  d.innerHTML = `<strong></strong><div class="bar ${cls}"><span class="fill other"></span>` +
    `<span class="fill"></span></div><div class="fig"></div>`;
  d.firstChild.textContent = label;
  d.querySelector(".fill.other").style.width = `${(used / total) * 100}%`;
  d.querySelector(".fill:not(.other)").style.width = `${(byModels / total) * 100}%`;
  d.lastChild.textContent = text;
  return d;
}

function onFeed(ev) {
  const data = JSON.parse(ev.data);
  if (ev.event === "hello") {
    const ids = new Set(data.ids);
    for (const id of [...models.keys()]) if (!ids.has(id)) remove(id);
    showMachine(data.machine);
  } else if (ev.event === "models") {
    data.forEach(upsert);
  } else if (ev.event === "model") {
    upsert(data);
  } else if (ev.event === "figures") {
    data.removed.forEach(remove);
    data.models.forEach(upsert);
    showMachine(data.machine);
  }
  order();
  document.body.dataset.live = "yes";
}

async function feed() {
  let wait = 500;
  for (;;) {
    try {
      await readEvents("dashboard/events", onFeed);
      say("");
    } catch (e) {
      if (e.status === 404) {
        say("This llamad has no dashboard feed (GET /dashboard/events); is it an older version?",
            true);
      }
    }
    document.body.dataset.live = "no";
    $("#status").textContent = "disconnected; reconnecting…";
    await new Promise((r) => { retryNow = r; setTimeout(r, wait); });
    wait = Math.min(wait * 2, 8000);
  }
}

// -- actions -----------------------------------------------------------------------

async function post(path, body) {
  const resp = await fetch(path, {
    method: "POST", body: JSON.stringify(body),
    headers: headers({ "Content-Type": "application/json" }),
  });
  let data = {};
  try { data = await resp.json(); } catch (e) { /* empty */ }
  if (!resp.ok) throw new Error((data.error && data.error.message) || `${resp.status}`);
  return data;
}

async function act(action, id) {
  if (action === "journal") return openJournal(id);
  const m = models.get(id);
  try {
    if (action === "pin") {
      const pinned = !m.entry.pinned;
      await post("models/pin", { model: id, pinned });
      upsert({ ...m.entry, pinned, ttl_left: pinned ? null : m.entry.ttl_left });
    } else {
      say(`${action === "load" ? "Loading" : "Unloading"} ${id}…`);
      await post(`models/${action}`, { model: id });
      say("");
    }
  } catch (e) {
    say(`${action} ${id}: ${e.message}`, true);
  }
}

// -- journal -----------------------------------------------------------------------

const MAX_LINES = 2000;

function openJournal(id) {
  if (journal) journal.abort.abort();
  const lines = $("#journal-lines");
  lines.replaceChildren();
  $("#journal").hidden = false;
  $("#journal-unit").textContent = models.get(id).entry.unit;
  journal = { model: id, abort: new AbortController(), lastId: null };
  followJournal(journal);
}

async function followJournal(j) {
  const lines = $("#journal-lines");
  while (!j.abort.signal.aborted) {
    try {
      const url = `logs/stream/${modelPath(j.model)}?lines=200`;
      await readEvents(url, (ev) => {
        j.lastId = ev.id || j.lastId;
        addLine(lines, JSON.parse(ev.data));
      }, j.abort.signal, j.lastId);
    } catch (e) {
      if (j.abort.signal.aborted) return;
      if (e.status === 404) {
        addLine(lines, { message: `the journal cannot be streamed: ${e.message}`, priority: 3 });
        return;
      }
    }
    await new Promise((r) => setTimeout(r, 1000));
  }
}

function addLine(box, entry) {
  const stick = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
  const line = document.createElement("div");
  line.className = `p${entry.priority ?? 6}`;
  const when = entry.time ? new Date(entry.time * 1000).toLocaleTimeString() + " " : "";
  line.textContent = when + entry.message;
  box.appendChild(line);
  while (box.childElementCount > MAX_LINES) box.firstChild.remove();
  if (stick) box.scrollTop = box.scrollHeight;
}

// -- start -------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("#journal-close").addEventListener("click", () => {
    if (journal) journal.abort.abort();
    journal = null;
    $("#journal").hidden = true;
  });
  $("#keyform").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY_STORE, $("#key").value);
    $("#keyform").hidden = true;
    retryNow();
  });
  setInterval(() => models.forEach(showTtl), 1000);
  feed();
});
