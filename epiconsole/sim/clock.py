"""Virtual time for the simulated lab.

The simulated lab runs ``scale`` times faster than real time so a whole matrix finishes in minutes.
Everything *inside* the lab (meter device clock and energy counters, inference durations, thermal
constants) runs on virtual seconds; the host keeps its real clock. The meter's device clock therefore
ticks ``scale`` times faster than the host's, which the driver's device->host clock fit absorbs, and
energy is integrated over device time (as on the real board), so joules per token come out at their
real-world magnitude.
"""

from __future__ import annotations

import asyncio
import time


class SimClock:
    def __init__(self, scale: float = 1.0) -> None:
        if scale <= 0:
            raise ValueError("time scale must be positive")
        self.scale = scale
        self._m0 = time.monotonic()

    def now(self) -> float:
        """Virtual seconds since the lab started (monotonic)."""
        return (time.monotonic() - self._m0) * self.scale

    def real_seconds(self, virtual: float) -> float:
        return virtual / self.scale

    async def sleep(self, virtual: float) -> None:
        """Sleep for ``virtual`` lab seconds."""
        await asyncio.sleep(max(virtual, 0.0) / self.scale)
