"""Telemetry ingest: the meter's stream -> a bounded buffer -> batched ledger commits.

It runs for as long as the lab service runs, not only during measurements: viewers always see live
watts, and the samples before a window are there when a window's start needs covering. One task
consumes the driver's events (cheap: a tuple per tick appended to a deque) and another commits the
buffer every ``flush_s`` (100 ms, so a tick waits about 100 ms and at most a few hundred on a loaded
machine before viewers can read it) as one :class:`SampleBlock`. If the ledger ever falls so far behind that the buffer is full, the oldest ticks
are dropped, counted, and recorded as an ``overflow`` gap: never silently.

Gaps the driver reports (lost lines, reboots, unplugs) are written with their cause; a stretch with no
sample for longer than ``meter.silent_after_s`` while the port stayed open is written as ``silent``.
Samples outside measurement windows are pruned after ``thresholds.retention_h`` hours (the ledger keeps
every window's samples).

Live figures per node (last watts, mean over 10 s, a short history for sparklines, energy since the
current window opened) are kept here for the service to publish; they cost O(1) per tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from epiconsole.ledger import Ledger, SampleBlock

log = logging.getLogger(__name__)

_NAN7 = (math.nan,) * 7
MEAN_WINDOW_S = 10.0
RECENT_STEP_S = 0.5
RECENT_POINTS = 240


@dataclass
class _ChannelLive:
    W: float = math.nan
    V: float = math.nan
    A: float = math.nan
    PF: float = math.nan
    Wh: float = math.nan
    sum_w: float = 0.0
    window_wh0: float | None = None


@dataclass(frozen=True)
class IngestStats:
    received: int
    committed: int
    dropped: int
    gaps: int
    flushes: int
    max_lag_s: float
    committed_t: float
    #: Median and 99th percentile of the commit lag (oldest tick's arrival to its commit), seconds.
    lag_p50_s: float = 0.0
    lag_p99_s: float = 0.0


class Telemetry:
    """Owns the ingest of one meter into one ledger. ``await start()``, ``await stop()``."""

    def __init__(
        self,
        ledger: Ledger,
        meter: Any,
        channels: dict[str, str],
        *,
        flush_s: float = 0.1,
        max_buffer: int = 200_000,
        silent_after_s: float = 2.0,
        retention_h: float = 0.0,
        retention_every_s: float = 60.0,
    ) -> None:
        self.ledger = ledger
        self.meter = meter
        #: channel id -> node name (from ``meter.channels``)
        self.channels = {int(k): v for k, v in channels.items()}
        self.nch = max(max(self.channels, default=3) + 1, 4)
        self.flush_s = flush_s
        self.silent_after_s = silent_after_s
        self.retention_h = retention_h
        self.retention_every_s = retention_every_s
        self._buf: deque[tuple[Any, ...]] = deque()
        self._max_buffer = max_buffer
        self._gaps: list[tuple[float, float, str, dict[str, Any]]] = []
        self._notes: list[tuple[str, str, str, dict[str, Any]]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._committed = asyncio.Condition()
        self.committed_t = -math.inf
        self.last_t = -math.inf
        self.last_host = -math.inf
        self._received = self._n_committed = self._dropped = self._n_gaps = self._flushes = 0
        self._max_lag = 0.0
        self._lags: deque[float] = deque(maxlen=10_000)
        self._oldest_host: float | None = None
        self._live = {ch: _ChannelLive() for ch in range(self.nch)}
        self._mean: deque[tuple[float, tuple[float, ...]]] = deque()
        self._recent: deque[tuple[float, tuple[float, ...]]] = deque(maxlen=RECENT_POINTS)
        self._window_t0: float | None = None
        self._window_broken = False
        self.info: Any = None
        self.connected = False

    # ----------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._consume(), name="telemetry consume"),
            loop.create_task(self._flusher(), name="telemetry flush"),
        ]
        if self.retention_h > 0:
            self._tasks.append(loop.create_task(self._retention(), name="telemetry retention"))

    async def stop(self) -> None:
        """Stop consuming and commit what is buffered."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        await self.flush()

    # ------------------------------------------------------------------------------- consume

    async def _consume(self) -> None:
        from drivers.epimeter import MeterGap, MeterInfo, MeterSample, MeterState

        nch = self.nch
        live = self._live
        async for ev in self.meter.events():
            tp = type(ev)
            if tp is MeterSample:
                chans: list[tuple[float, ...] | None] = [None] * nch
                ws = [math.nan] * nch
                for c in ev.channels:
                    if 0 <= c.id < nch:
                        chans[c.id] = (c.V, c.A, c.W, c.VAR, c.PF, c.Hz, c.Wh)
                        ws[c.id] = c.W
                        cl = live[c.id]
                        cl.W, cl.V, cl.A, cl.PF, cl.Wh = c.W, c.V, c.A, c.PF, c.Wh
                        if self._window_t0 is not None and cl.window_wh0 is None and ev.t >= self._window_t0:
                            cl.window_wh0 = c.Wh
                t = ev.t
                # Silence is judged on arrival times: a stuck board's device clock says nothing about it.
                quiet = ev.host_time - self.last_host
                if self.last_host > -math.inf and quiet > self.silent_after_s and not self._gap_pending(t):
                    self._add_gap(self.last_host, ev.host_time, "silent", {"seconds": quiet})
                if len(self._buf) >= self._max_buffer:
                    old = self._buf.popleft()
                    self._dropped += 1
                    self._add_gap(old[0], self._buf[0][0] if self._buf else old[0], "overflow", {"dropped": 1})
                if not self._buf:
                    self._oldest_host = ev.host_time
                self._buf.append((t, ev.seq, ev.ms, ev.st, chans))
                self._received += 1
                self.last_t = t
                self.last_host = ev.host_time
                self._track(t, tuple(ws))
            elif tp is MeterGap:
                self._add_gap(ev.t0, ev.t1, ev.cause, {"lost": ev.lost})
                if ev.cause == "reboot" and self._window_t0 is not None:
                    self._window_broken = True
            elif tp is MeterInfo:
                self.info = ev
            elif tp is MeterState:
                self.connected = ev.connected
                level = "info" if ev.connected else "warning"
                what = "connected" if ev.connected else "disconnected"
                self._notes.append((f"meter.{what}", f"meter {what} on {ev.port} ({ev.reason})", level,
                                    {"port": ev.port, "reason": ev.reason, "t": ev.host_time}))

    def _gap_pending(self, t: float) -> bool:
        """A driver gap already explains the stretch ending at ``t`` (it arrives just before the sample)."""
        return bool(self._gaps) and abs(self._gaps[-1][1] - t) < 1e-6

    def _add_gap(self, t0: float, t1: float, cause: str, data: dict[str, Any]) -> None:
        self._gaps.append((t0, max(t0, t1), cause, data))
        self._n_gaps += 1

    def _track(self, t: float, ws: tuple[float, ...]) -> None:
        mean = self._mean
        mean.append((t, ws))
        while mean and t - mean[0][0] > MEAN_WINDOW_S:
            mean.popleft()
        if not self._recent or t - self._recent[-1][0] >= RECENT_STEP_S:
            self._recent.append((t, ws))

    # --------------------------------------------------------------------------------- flush

    async def _flusher(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            # A fixed cadence (not flush_s after the previous commit ended), so commit time does not add up.
            due = max(due + self.flush_s, loop.time())
            await asyncio.sleep(due - loop.time())
            try:
                await self.flush()
            except Exception:  # a failing commit must not end ingest; the buffer keeps the ticks
                log.exception("telemetry flush failed")

    async def flush(self) -> None:
        """Commit the buffered ticks, gaps and meter notes now."""
        ticks = list(self._buf)
        oldest, self._oldest_host = self._oldest_host, None
        gaps, self._gaps = self._gaps, []
        notes, self._notes = self._notes, []
        if ticks:
            block = SampleBlock.from_ticks(ticks, channels=self.nch)
            await self.ledger.insert_samples(block)
            for _ in range(len(ticks)):
                self._buf.popleft()
            self._n_committed += len(ticks)
            newest = float(block.t.max())
            if oldest is not None:
                # How long the oldest tick of this commit waited since it arrived.
                lag = time.time() - oldest
                self._lags.append(lag)
                self._max_lag = max(self._max_lag, lag)
            if self._buf:
                self._oldest_host = time.time()  # ticks that arrived during the commit
            self._flushes += 1
            async with self._committed:
                self.committed_t = max(self.committed_t, newest)
                self._committed.notify_all()
        for t0, t1, cause, data in gaps:
            await self.ledger.insert_gap(t0, t1, cause, None, data)
            await self.ledger.event("meter.gap", f"meter gap of {t1 - t0:.2f} s ({cause})", "warning",
                                    {"t0": t0, "t1": t1, "cause": cause, **data})
        for kind, message, level, data in notes:
            await self.ledger.event(kind, message, level, data)

    async def wait_committed(self, t: float, timeout: float) -> bool:
        """Wait until a sample at or after host time ``t`` is committed; False on timeout."""
        async def wait() -> None:
            async with self._committed:
                await self._committed.wait_for(lambda: self.committed_t >= t)

        try:
            await asyncio.wait_for(wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def _retention(self) -> None:
        while True:
            await asyncio.sleep(self.retention_every_s)
            try:
                n = await self.ledger.prune_samples(time.time() - self.retention_h * 3600.0)
                if n:
                    log.info("retention: pruned %d samples older than %g h", n, self.retention_h)
            except Exception:
                log.exception("sample retention failed")

    # ---------------------------------------------------------------------------------- live

    def silent_s(self, now: float | None = None) -> float:
        """Seconds since the last sample arrived (inf before the first)."""
        return (now if now is not None else time.time()) - self.last_host

    def window_begin(self, t0: float) -> None:
        self._window_t0 = t0
        self._window_broken = False
        for cl in self._live.values():
            cl.window_wh0 = None

    def window_end(self) -> None:
        self._window_t0 = None

    def window_joules(self) -> float | None:
        """Energy since the current window opened, all mapped channels, from the energy counters."""
        if self._window_t0 is None or self._window_broken:
            return None
        total = 0.0
        for ch in self.channels:
            cl = self._live.get(ch)
            if cl is None or cl.window_wh0 is None or math.isnan(cl.Wh):
                return None
            total += (cl.Wh - cl.window_wh0) * 3600.0
        return total

    def node_figures(self) -> dict[str, dict[str, Any]]:
        """Per node: channel, last W/V/A/PF/Wh, mean W over 10 s and recent (t, W) pairs (NaN -> None)."""
        out: dict[str, dict[str, Any]] = {}
        n_mean = len(self._mean)
        for ch, node in sorted(self.channels.items()):
            cl = self._live[ch]
            vals = [w[ch] for _, w in self._mean if not math.isnan(w[ch])] if n_mean else []
            out[node] = {
                "channel": ch,
                "W": _num(cl.W),
                "V": _num(cl.V),
                "A": _num(cl.A),
                "PF": _num(cl.PF),
                "Wh": _num(cl.Wh),
                "W_mean_10s": sum(vals) / len(vals) if vals else None,
                "recent": tuple((round(t, 3), round(w[ch], 3)) for t, w in self._recent if not math.isnan(w[ch])),
            }
        return out

    def stats(self) -> IngestStats:
        lags = sorted(self._lags)
        p50 = lags[len(lags) // 2] if lags else 0.0
        p99 = lags[min(len(lags) - 1, int(len(lags) * 0.99))] if lags else 0.0
        return IngestStats(self._received, self._n_committed, self._dropped, self._n_gaps, self._flushes,
                           self._max_lag, self.committed_t, p50, p99)


def _num(x: float) -> float | None:
    return None if x is None or math.isnan(x) else x
