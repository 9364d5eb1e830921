"""The downloader's STATUS= line (catalog/fetch.py): one JSON object that llamad reads from
systemd (supervisor/downloads.py), sent at each phase and, while bytes arrive, every
STATUS_EVERY seconds."""

from __future__ import annotations

import json
import time
from typing import Any

from llamad.systemd.activation import Notifier

STATUS_EVERY = 0.25  # seconds between progress lines
NOTIFY_MAX = 4096  # bytes of a notify message systemd takes (NOTIFY_BUFFER_MAX, PIPE_BUF)


class Status:
    """The unit's STATUS= line: one JSON object, sent at each phase and, while bytes
    arrive, every STATUS_EVERY seconds."""

    def __init__(self) -> None:
        self.notifier = Notifier()
        self.fields: dict[str, Any] = {"phase": "planning"}
        self.last = 0.0
        self.base = 0  # bytes of the files already in place

    def send(self, ready: bool = False, **fields: Any) -> None:
        self.fields.update(fields)
        message = ("READY=1\n" if ready else "") + "STATUS="
        shown = dict(self.fields)
        # systemd ignores a message longer than NOTIFY_MAX, READY=1 in it: a plan of many
        # shards is told by their count (llamad reads none of their names), then without
        # the file's address, the longest field left.
        for drop in ("files", "url"):
            text = json.dumps(shown, separators=(",", ":"))
            if len((message + text).encode()) <= NOTIFY_MAX:
                break
            if isinstance(shown.get(drop), list):
                shown[drop] = len(shown[drop])
            else:
                shown.pop(drop, None)
        self.notifier.send(message + json.dumps(shown, separators=(",", ":")))
        self.last = time.monotonic()

    def progress(self, file_done: int, phase: str = "downloading") -> None:
        fields: dict[str, Any] = {"phase": phase, "file_done": file_done,
                                  "done": self.base + file_done}
        if time.monotonic() - self.last >= STATUS_EVERY:
            self.send(**fields)
        else:
            self.fields.update(fields)
