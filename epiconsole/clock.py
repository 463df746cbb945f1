"""The engine's clock: host time for timestamps, lab time for waits.

The simulated lab runs ``time_scale`` times faster than real time (see :mod:`epiconsole.sim.clock`), so
every wait the engine and the service make *in lab terms* (stabilize for 60 s, settle a suspender for
30 s, poll health every 2 s) must shrink by the same factor; timestamps stay host epoch seconds, the
ledger's time base. Against the real lab the scale is 1.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any


class Clock:
    """Host time for timestamps; ``sleep``/``real`` convert lab seconds to real ones by ``scale``."""

    def __init__(self, scale: float = 1.0) -> None:
        if scale <= 0:
            raise ValueError("the clock's time scale must be positive")
        self.scale = float(scale)

    @classmethod
    def for_config(cls, cfg: Any) -> Clock:
        """Scale ``cfg.sim.time_scale`` for the simulated lab, 1 for a real one."""
        return cls(cfg.sim.time_scale if cfg.simulated else 1.0)

    def time(self) -> float:
        """Host epoch seconds (the ledger's time base)."""
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def real(self, lab_seconds: float) -> float:
        """Real seconds that ``lab_seconds`` of lab time take."""
        return max(lab_seconds, 0.0) / self.scale

    def lab(self, real_seconds: float) -> float:
        """Lab seconds that pass in ``real_seconds`` of real time."""
        return real_seconds * self.scale

    async def sleep(self, lab_seconds: float) -> None:
        """Sleep ``lab_seconds`` of lab time."""
        await asyncio.sleep(self.real(lab_seconds))
