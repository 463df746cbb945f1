"""Log controller: the ledger's event stream, read incrementally into a bounded buffer, filtered by
level and text."""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from screens.controllers import fmt
from screens.controllers.source import DataSource

if TYPE_CHECKING:
    from epiconsole.ledger import Event

LEVELS = ("debug", "info", "warning", "error")
BUFFER = 5000



#: A float printed with its full repr (``1.5599178442963393``): seven or more decimals.
_LONG_FLOAT = re.compile(r"(?<![\w.])-?\d+\.\d{7,}(?![\w.])")


def short_floats(message: str) -> str:
    """Shorten full-repr floats in an event message to 4 significant digits (``0.8000000000000002`` reads
    as ``0.8``); the ledger keeps the message as written."""
    return _LONG_FLOAT.sub(lambda m: f"{float(m.group()):.4g}", message)

@dataclass(frozen=True)
class LogLine:
    id: int
    time: str
    level: str
    kind: str
    message: str


@dataclass(frozen=True)
class LogView:
    lines: tuple[LogLine, ...]
    shown: int
    total: int
    min_level: str
    text: str


class LogController:
    def __init__(self, buffer: int = BUFFER) -> None:
        self._events: deque[Event] = deque(maxlen=buffer)
        self._last_id = 0
        self.min_level = "info"
        self.text = ""

    @property
    def last_id(self) -> int:
        return self._last_id

    async def poll(self, source: DataSource) -> list[Event]:
        """Read events newer than the last seen; returns the new ones (oldest first)."""
        if self._last_id == 0:
            new = await source.last_events(500)
        else:
            new = await source.events_after(self._last_id, 1000)
        for e in new:
            self._events.append(e)
        if new:
            self._last_id = new[-1].id
        return new

    def cycle_level(self) -> str:
        self.min_level = LEVELS[(LEVELS.index(self.min_level) + 1) % len(LEVELS)]
        return self.min_level

    def matches(self, e: Event) -> bool:
        if LEVELS.index(e.level) < LEVELS.index(self.min_level) if e.level in LEVELS else False:
            return False
        if self.text:
            needle = self.text.lower()
            return needle in e.message.lower() or needle in e.kind.lower()
        return True

    def line(self, e: Event) -> LogLine:
        return LogLine(e.id, fmt.clock(e.t), e.level, e.kind, short_floats(e.message))

    def view(self) -> LogView:
        lines = tuple(self.line(e) for e in self._events if self.matches(e))
        return LogView(lines, len(lines), len(self._events), self.min_level, self.text)
