"""The lab monitor: polls node health and the room temperature over SSH while the service runs.

It feeds three consumers: the suspenders (:meth:`Monitor.conditions`: meter silent, node unreachable,
node throttled or too hot, ambient out of band), the validity checks (:meth:`Monitor.window_health`:
what was seen between a window's markers) and the live view (:meth:`Monitor.latest`). Polling runs on
lab time (every ``interval_s`` lab seconds, never faster than ``min_real_s`` real seconds, so the
simulated lab is not flooded with SSH sessions), and :meth:`poll_now` takes a reading at once (the
engine asks for one right after a window closes, so every window has a reading at its end).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any

from epiconsole.clock import Clock
from epiconsole.engine.validity import WindowHealth

log = logging.getLogger(__name__)

HISTORY = 50_000


class Monitor:
    def __init__(
        self,
        cfg: Any,
        cluster: Any,
        telemetry: Any,
        clock: Clock,
        *,
        interval_s: float = 5.0,
        min_real_s: float = 0.25,
        ambient_every: int = 4,
    ) -> None:
        self.cfg = cfg
        self.cluster = cluster
        self.telemetry = telemetry
        self.clock = clock
        self.interval_real = max(clock.real(interval_s), min_real_s)
        self.ambient_every = ambient_every
        self.health: dict[str, Any] = {}
        self.health_t: dict[str, float] = {}
        self.ambient: float | None = None
        self.ambient_t = 0.0
        self.ambient_error = ""
        self.history: deque[tuple[float, Any]] = deque(maxlen=HISTORY)
        self.ambient_history: deque[tuple[float, float]] = deque(maxlen=HISTORY)
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._polls = 0
        self._started = time.time()

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="lab monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.poll_now()
            except Exception:  # a monitor that dies would silence every suspender
                log.exception("health poll failed")
            await asyncio.sleep(self.interval_real)

    async def poll_now(self) -> None:
        """Read every node's health (and every few polls the ambient temperature) now."""
        async with self._lock:
            timeout = min(self.cfg.hosts[self.cfg.cluster.root].connect_timeout_s, 5.0) + 1.0
            readings = await self.cluster.health_all(timeout=timeout)
            now = time.time()
            for node, h in readings.items():
                self.health[node] = h
                self.health_t[node] = now
                self.history.append((now, h))
            if self._polls % self.ambient_every == 0 or self.ambient is None:
                try:
                    self.ambient = await self.cluster.ambient_c(timeout=timeout)
                    self.ambient_t = now
                    self.ambient_error = ""
                    self.ambient_history.append((now, self.ambient))
                except Exception as exc:  # the sensor's absence is a condition, not a crash
                    self.ambient_error = str(exc) or type(exc).__name__
            self._polls += 1

    # ---------------------------------------------------------------------------- conditions

    def conditions(self) -> dict[str, str]:
        """Suspender conditions that are bad now (name -> detail)."""
        th = self.cfg.thresholds
        bad: dict[str, str] = {}
        silent = self.telemetry.silent_s()
        if not self.telemetry.connected and self.telemetry.last_host > float("-inf"):
            bad["meter"] = "disconnected"
        elif silent > self.cfg.meter.silent_after_s:
            bad["meter"] = "no sample yet" if silent == float("inf") else f"silent for {silent:.1f} s"
        for node in self.cfg.cluster.nodes:
            h = self.health.get(node)
            if h is None:
                if time.time() - self._started > 2 * self.interval_real + 10:
                    bad[f"{node} unreachable"] = "no health reading"
                continue
            if not h.ok:
                bad[f"{node} unreachable"] = (h.error or "no answer").split(";")[0]
                continue
            if h.temp_c is not None and h.temp_c >= th.node_temp_max_c:
                bad[f"{node} hot"] = f"{h.temp_c:.1f} °C"
            if th.on_throttle == "redo" and h.throttled_now:
                bad[f"{node} throttled"] = ", ".join(h.throttled_now)
        lo, hi = th.ambient_c - th.ambient_tol_c, th.ambient_c + th.ambient_tol_c
        if self.ambient is not None and not lo <= self.ambient <= hi:
            bad["ambient"] = f"{self.ambient:.1f} °C outside {lo:g}..{hi:g} °C"
        return bad

    # ---------------------------------------------------------------------------------- window

    def window_health(self, t0: float, t1: float) -> WindowHealth:
        """What was read between ``t0`` and ``t1`` (plus the last reading before ``t0`` per node)."""
        nodes = self.cfg.cluster.nodes
        before: dict[str, Any] = {}
        inside: dict[str, list[Any]] = {n: [] for n in nodes}
        for t, h in self.history:
            if t < t0:
                before[h.node] = h
            elif t <= t1 and h.node in inside:
                inside[h.node].append(h)
        throttled: dict[str, list[str]] = {}
        governors: dict[str, list[str]] = {}
        temps: dict[str, float] = {}
        readings: dict[str, int] = {}
        for n in nodes:
            seen = ([before[n]] if n in before else []) + inside[n]
            ok = [h for h in seen if h.ok]
            readings[n] = len(ok)
            throttled[n] = sorted({b for h in ok for b in h.throttled_now})
            governors[n] = sorted({h.governor for h in ok if h.governor})
            ts = [h.temp_c for h in ok if h.temp_c is not None]
            if ts:
                temps[n] = max(ts)
        amb_before = [a for t, a in self.ambient_history if t < t0][-1:]
        amb = amb_before + [a for t, a in self.ambient_history if t0 <= t <= t1]
        return WindowHealth(throttled=throttled, governors=governors, max_temp_c=temps,
                            ambient_c=(min(amb), max(amb)) if amb else None, readings=readings)

    def nodes_live(self) -> dict[str, dict[str, Any]]:
        """Per node health fields for the live view."""
        out: dict[str, dict[str, Any]] = {}
        for node in self.cfg.cluster.nodes:
            h = self.health.get(node)
            if h is None:
                out[node] = {"ssh_ok": None}
                continue
            out[node] = {
                "ssh_ok": bool(h.ok),
                "ssh_error": h.error or "",
                "temp_c": h.temp_c,
                "arm_hz": h.arm_hz,
                "governor": h.governor or "",
                "load1": h.load1,
                "throttled_now": tuple(h.throttled_now),
                "throttled_since": tuple(h.throttled_since),
                "health_time": self.health_t.get(node, 0.0),
            }
        return out
