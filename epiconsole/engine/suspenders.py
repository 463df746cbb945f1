"""Suspenders (after Bluesky): conditions watched continuously that interrupt a measurement.

A condition is bad (meter silent, a node unreachable, a node throttled or too hot, ambient out of band)
or good. Any bad condition *trips* at once: the engine discards the measurement in progress. The trip is
*released* only once every condition has been good without interruption for the settle time (lab
seconds, so the simulated lab settles ``time_scale`` times faster): the hysteresis that keeps a flapping
condition from restarting measurements over and over.

Conditions come from a callable (the lab's monitor); the suspender polls it, so it needs no callbacks
from the hardware side and a test can drive it with a dict.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from epiconsole.clock import Clock


@dataclass(frozen=True)
class Trip:
    """One trip: which conditions were bad, when it tripped and (once released) when it was released."""

    reason: str
    t0: float
    t1: float | None = None


def describe(conditions: dict[str, str]) -> str:
    """One line naming every bad condition, in a stable order."""
    return "; ".join(f"{k}: {v}" if v else k for k, v in sorted(conditions.items()))


class Suspenders:
    def __init__(
        self,
        conditions: Callable[[], dict[str, str]],
        clock: Clock,
        settle_s: float,
        poll_s: float = 0.05,
    ) -> None:
        self._conditions = conditions
        self.clock = clock
        self.settle_s = settle_s
        self.poll_s = poll_s
        self.trips: list[Trip] = []

    def bad(self) -> dict[str, str]:
        """The conditions that are bad right now."""
        return dict(self._conditions())

    def reason(self) -> str:
        """Why a measurement may not run now ('' when it may)."""
        return describe(self.bad())

    async def wait_trip(self) -> str:
        """Return (with the reason) as soon as any condition is bad."""
        while True:
            reason = self.reason()
            if reason:
                return reason
            await asyncio.sleep(self.poll_s)

    async def wait_clear(self, on_change: Callable[[str], None] | None = None) -> float:
        """Wait until every condition has held good for the settle time; returns the real seconds waited.

        ``on_change`` hears each new reason while waiting (e.g. the meter came back but a node is hot).
        """
        start = self.clock.monotonic()
        good_since: float | None = None
        last = None
        while True:
            reason = self.reason()
            now = self.clock.monotonic()
            if reason:
                good_since = None
                if reason != last and on_change is not None:
                    on_change(reason)
            elif good_since is None:
                good_since = now
            elif now - good_since >= self.clock.real(self.settle_s):
                return now - start
            last = reason
            await asyncio.sleep(self.poll_s)

    def record(self, reason: str, t0: float, t1: float | None) -> None:
        self.trips.append(Trip(reason, t0, t1))
