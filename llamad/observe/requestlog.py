"""The request log: one structured journal entry per request to a model.

    journalctl -u llamad MODEL=gemma-a -o json

Fields (docs/operations.md): MODEL, STATUS, CODE, METHOD, PATH, STREAM, QUEUE_MS, TTFT_MS,
DURATION_MS, PROMPT_TOKENS, COMPLETION_TOKENS, and MESSAGE_ID, the same for every request
entry. Never the prompt or the answer. Every string has its control characters escaped
first: the journal's export format and systemd's own parsers treat them as structure.

Each entry is one datagram to journald's socket (its native protocol, as sd_journal_send
writes it), sent from the event loop without waiting: ~10 us a request. What journald has
no room for yet waits, in order, for the next entry or the daemon's tick; a journald
further behind than BACKLOG entries costs entries, counted and logged, never the loop's
time. (The writer thread this replaced held the GIL for milliseconds every 50 ms batch,
python-systemd formatting each field in Python: that was the p99 of every cheap request,
docs/benchmarks.md.)

The same writer puts llamad's notes about a model into that model's own journal
(`journalctl -u llama-server@x`, which shows entries root sends with
OBJECT_SYSTEMD_UNIT=): what fitting chose for it when it starts, and why (`fit_notes`).
"""

from __future__ import annotations

import logging
import socket
from collections import deque
from collections.abc import Callable

from llamad.http.record import Record
from llamad.safetext import one_line, readable
from llamad.supervisor.events import Cause, Change, State

log = logging.getLogger("llamad.requestlog")

MESSAGE_ID = "0f1c8d3ad0e54c6c9e1b8f7a62d5b4e3"  # `journalctl MESSAGE_ID=...` finds them all
FIT_MESSAGE_ID = "6b1f0e8a3c2d4f5e9a7b1c3d5e7f9a0b"  # what fitting chose for a model
JOURNAL = "/run/systemd/journal/socket"
BACKLOG = 10_000  # entries kept while journald is behind


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
    # What journalctl prints: bidi formatting escaped too. MODEL= keeps the name, so that
    # `journalctl MODEL=<name>` finds it.
    out["MESSAGE"] = (f"{readable(rec.model)} {out['METHOD']} {readable(out['PATH'])} {rec.status}"
                      f"{' ' + out['CODE'] if rec.code else ''} in "
                      f"{numbers['DURATION_MS']} ms{tokens}")
    return out


class JournalWriter:
    """The request log's sink, and where llamad's notes about a model go."""

    def __init__(self, address: str = JOURNAL) -> None:
        self.address = address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                                   | socket.SOCK_CLOEXEC)
        # Entries journald had no room for yet (its socket queues only a few hundred),
        # sent first by the next entry or the daemon's tick; beyond BACKLOG, dropped.
        self._backlog: deque[bytes] = deque()
        self.dropped = 0
        self._failing = False

    def __call__(self, rec: Record) -> None:
        self._send(fields(rec))

    def note(self, unit: str, message: str) -> None:
        """A line of llamad's about a model, in that model's unit's journal. Not a request:
        it carries no MODEL= (`journalctl -u llamad MODEL=x` lists x's requests alone)."""
        self._send({"MESSAGE": one_line(message), "OBJECT_SYSTEMD_UNIT": clean(unit),
                    "MESSAGE_ID": FIT_MESSAGE_ID})

    def _send(self, entry: dict[str, str]) -> None:
        # Every value is one line (clean()), so each field is a plain KEY=value line.
        entry = {"PRIORITY": "6", "SYSLOG_IDENTIFIER": "llamad", "MESSAGE_ID": MESSAGE_ID,
                 **entry}
        if len(self._backlog) >= BACKLOG:
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.warning("the journal is behind: %d request log entries dropped so far",
                            self.dropped)
            return
        self._backlog.append("".join(f"{key}={value}\n" for key, value in entry.items())
                             .encode())
        self.flush()

    def flush(self) -> None:
        """Send what journald has room for, oldest first; never waits."""
        while self._backlog:
            try:
                self._sock.sendto(self._backlog[0], self.address)
            except BlockingIOError:
                return
            except OSError as e:  # journald gone or restarting: say so once, keep going
                if not self._failing:
                    log.warning("cannot write the request log to the journal: %s", e)
                self._failing = True
                self.dropped += len(self._backlog)
                self._backlog.clear()
                return
            self._failing = False
            self._backlog.popleft()

    def close(self) -> None:
        self.flush()
        self.dropped += len(self._backlog)
        self._sock.close()


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
