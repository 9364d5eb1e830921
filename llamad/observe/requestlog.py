"""The request log: one structured journal entry per request to a model.

    journalctl -u llamad MODEL=gemma-a -o json

Fields (docs/operations.md): MODEL, STATUS, CODE, METHOD, PATH, STREAM, QUEUE_MS, TTFT_MS,
DURATION_MS, PROMPT_TOKENS, COMPLETION_TOKENS, and MESSAGE_ID, the same for every request
entry. Never the prompt or the answer. Every string has its control characters escaped
first: the journal's export format and systemd's own parsers treat them as structure.

One writer thread sends the entries, so a journald that falls behind never stalls the
event loop; when QUEUE entries wait already, further ones are dropped, and logged as such.

The same thread writes llamad's notes about a model into that model's own journal
(`journalctl -u llama-server@x`, which shows entries root sends with
OBJECT_SYSTEMD_UNIT=): what fitting chose for it when it starts, and why (`fit_notes`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from systemd import journal

from llamad.http.record import Record
from llamad.safetext import one_line
from llamad.supervisor.events import Cause, Change, State

log = logging.getLogger("llamad.requestlog")

MESSAGE_ID = "0f1c8d3ad0e54c6c9e1b8f7a62d5b4e3"  # `journalctl MESSAGE_ID=...` finds them all
FIT_MESSAGE_ID = "6b1f0e8a3c2d4f5e9a7b1c3d5e7f9a0b"  # what fitting chose for a model
QUEUE = 10_000
BATCH = 0.05  # seconds the writer naps between batches


def clean(text: str) -> str:
    """`text` with control characters escaped (safetext), as one journal field."""
    return one_line(text)


def fields(rec: Record) -> dict[str, str]:
    """The journal fields of one request; MESSAGE is the line people read."""
    numbers = {"QUEUE_MS": rec.ms(rec.acquired), "TTFT_MS": rec.ms(rec.first_byte),
               "DURATION_MS": rec.ms(rec.ended), "PROMPT_TOKENS": rec.prompt_tokens,
               "COMPLETION_TOKENS": rec.completion_tokens}
    out = {"MODEL": clean(rec.model), "STATUS": str(rec.status), "METHOD": clean(rec.method),
           "PATH": clean(rec.path), "STREAM": "1" if rec.stream else "0",
           **{k: str(v) for k, v in numbers.items() if v is not None}}
    if rec.code:
        out["CODE"] = clean(rec.code)
    tokens = (f", {rec.prompt_tokens or 0}+{rec.completion_tokens or 0} tokens"
              if rec.prompt_tokens is not None or rec.completion_tokens is not None else "")
    out["MESSAGE"] = (f"{out['MODEL']} {out['METHOD']} {out['PATH']} {rec.status}"
                      f"{' ' + out['CODE'] if rec.code else ''} in "
                      f"{numbers['DURATION_MS']} ms{tokens}")
    return out


class JournalWriter:
    """The request log's sink: queues entries for its own thread."""

    def __init__(self, send: Callable[..., Any] = journal.send) -> None:
        self._send = send
        self._queue: queue.Queue[dict[str, str] | Record | None] = queue.Queue(QUEUE)
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="llamad-request-log",
                                        daemon=True)
        self._thread.start()

    def __call__(self, rec: Record) -> None:
        self._put(rec)  # ended: nothing changes it any more; its fields are made off the loop

    def note(self, unit: str, message: str) -> None:
        """A line of llamad's about a model, in that model's unit's journal. Not a request:
        it carries no MODEL= (`journalctl -u llamad MODEL=x` lists x's requests alone)."""
        self._put({"MESSAGE": one_line(message), "OBJECT_SYSTEMD_UNIT": clean(unit),
                   "MESSAGE_ID": FIT_MESSAGE_ID})

    def _put(self, entry: dict[str, str] | Record) -> None:
        try:
            self._queue.put_nowait(entry)
        except queue.Full:
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.warning("the journal is behind: %d request log entries dropped so far",
                            self.dropped)

    def _run(self) -> None:
        """Send what is queued, then nap: the thread wakes once per BATCH seconds at most,
        not once per request. Each wake-up takes the GIL from the event loop (measured: a
        tenth of the event loop's time per proxied request went to waking it)."""
        failing = False
        while True:
            entry = self._queue.get()
            while entry is not None:
                failing = self._write(entry, failing)
                try:
                    entry = self._queue.get_nowait()
                except queue.Empty:
                    break
            if entry is None:  # close()
                return
            time.sleep(BATCH)

    def _write(self, item: dict[str, str] | Record, failing: bool) -> bool:
        """Send one entry; returns whether sending failed."""
        try:
            entry = fields(item) if isinstance(item, Record) else item
            message = entry.pop("MESSAGE")
            entry.setdefault("MESSAGE_ID", MESSAGE_ID)
            self._send(message, PRIORITY="6", SYSLOG_IDENTIFIER="llamad", **entry)
            return False
        except Exception as e:  # journald gone or restarting: say so once, keep going
            if not failing:
                log.warning("cannot write the request log to the journal: %s", e)
            return True

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (up to `timeout` seconds), then stop the thread."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)


def fit_notes(writer: JournalWriter, unit_of: Callable[[str], str | None]) -> Callable[
        [Change], None]:
    """A listener of model state changes: when a model starts with what fitting chose
    (the STARTING change's detail), say so in its own journal."""
    def on_change(change: Change) -> None:
        if change.new is State.STARTING and change.cause is Cause.LOAD and change.detail:
            unit = unit_of(change.model)
            if unit is not None:
                writer.note(unit, f"llamad: {change.detail}")
    return on_change
