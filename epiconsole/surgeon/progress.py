"""Progress events: JSON lines on stdout for the console (``--json``), short text lines otherwise.

Every event is a flat JSON object with an ``"event"`` key (``start``, ``shard``, ``tensor``, ``check``,
``done``, ``error`` ...). Tensor events are rate-limited (at most one per ``min_interval_s`` per
reporter, plus the last of each shard) so a 18 000-tensor checkpoint does not flood an SSH channel.
Safe to call from several threads.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import IO, Any


class Progress:
    """Emits progress events as JSON lines (``json_mode``) or as human-readable lines on stderr."""

    def __init__(self, json_mode: bool = False, stream: IO[str] | None = None, min_interval_s: float = 0.25) -> None:
        self.json_mode = json_mode
        self._stream = stream
        self._lock = threading.Lock()
        self._min_interval = min_interval_s
        self._last_tensor = 0.0
        self.events: list[dict[str, Any]] = []  # kept for callers that want a summary

    def _out(self) -> IO[str]:
        if self._stream is not None:
            return self._stream
        return sys.stdout if self.json_mode else sys.stderr

    def emit(self, event: str, **fields: Any) -> None:
        record = {"event": event, **fields}
        with self._lock:
            if event != "tensor":
                self.events.append(record)
            out = self._out()
            if self.json_mode:
                out.write(json.dumps(record, separators=(",", ":"), default=str) + "\n")
            else:
                out.write(_human(record) + "\n")
            out.flush()

    def tensor(self, *, force: bool = False, **fields: Any) -> None:
        """A per-tensor event, dropped when the previous one was less than ``min_interval_s`` ago."""
        now = time.monotonic()
        with self._lock:
            if not force and now - self._last_tensor < self._min_interval:
                return
            self._last_tensor = now
        if self.json_mode:
            self.emit("tensor", **fields)


def _human(record: dict[str, Any]) -> str:
    event = record["event"]
    rest = {k: v for k, v in record.items() if k != "event"}
    if event == "error":
        return f"error: {rest.get('message', '')}"
    if event == "check":
        mark = "ok  " if rest.get("ok") else "FAIL"
        detail = f" - {rest['detail']}" if rest.get("detail") else ""
        return f"  [{mark}] {rest.get('name', '')}{detail}"
    if event == "shard":
        return f"  shard {rest.get('index', '?')}/{rest.get('total', '?')} {rest.get('file', '')} ({rest.get('bytes', 0):,} bytes)"
    return f"{event}: " + ", ".join(f"{k}={v}" for k, v in rest.items())
