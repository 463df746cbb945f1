"""What the engine reports while it runs: one :class:`EngineEvent` per stage transition, suspender trip
and release, validity verdict, result and campaign change.

The same events go to in-process listeners (the headless runner prints them) and into the ledger's
event log (``kind`` = the event name, ``data`` = its fields), so a runner following a separate lab
service rebuilds exactly the same stream from the ledger with :meth:`EngineEvent.from_ledger`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: Event names the engine emits (``--json`` prints one object per line with ``"event"`` set to one of them).
EVENT_NAMES = ("campaign", "stage", "suspended", "resumed", "verdict", "result", "paused", "command")

#: Ledger event kinds that are engine events (the ledger also holds other kinds, e.g. meter gaps).
LEDGER_PREFIX = "engine."


@dataclass(frozen=True)
class EngineEvent:
    event: str
    data: dict[str, Any] = field(default_factory=dict)
    t: float = field(default_factory=time.time)
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"event": self.event, "t": round(self.t, 3), **self.data}

    @property
    def ledger_kind(self) -> str:
        return LEDGER_PREFIX + self.event

    @classmethod
    def from_ledger(cls, kind: str, message: str, data: dict[str, Any] | None, t: float) -> EngineEvent | None:
        """The engine event a ledger event row holds, or None for other kinds of event."""
        if not kind.startswith(LEDGER_PREFIX):
            return None
        return cls(kind[len(LEDGER_PREFIX):], dict(data or {}), t, message)


Listener = Callable[[EngineEvent], None]
