"""Helpers for the epi-meter tests: protocol lines of every kind, a scripted pty, a freezable lab clock."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
import tty
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from drivers.epimeter import EpiMeter, MeterEvent, MeterSample
from epiconsole.sim.clock import SimClock


def sample_obj(seq: int, ms: int, wh: float = 1.0, st: int = 0, channels: int = 4) -> dict:
    return {
        "v": 1, "seq": seq, "ms": ms, "st": st,
        "ch": [{"id": i, "V": 229.8, "A": 0.052 + i / 1000, "W": 10.4 + i, "VAR": 2.1, "PF": 0.91, "Hz": 50.01,
                "Wh": wh + i} for i in range(channels)],
    }


def sample_line(seq: int, ms: int, wh: float = 1.0, st: int = 0, channels: int = 4) -> bytes:
    return json.dumps(sample_obj(seq, ms, wh, st, channels), separators=(",", ":")).encode() + b"\n"


def bad_line(kind: str, rng: random.Random) -> bytes:
    """One newline-terminated line that the driver must classify as ``kind``."""
    good = sample_line(rng.randrange(1 << 32), rng.randrange(1 << 32)).rstrip(b"\n")
    if kind == "garbage":
        alphabet = bytes(b for b in range(256) if b not in b"\n{}")
        return bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) + b"\n"
    if kind == "partial":  # the head of a line (cut at the tail) or its tail (cut at the head)
        while True:
            cut = rng.randint(2, len(good) - 2)
            piece = good[:cut] if rng.random() < 0.5 else good[cut:]
            # A cut at a channel object's brace would leave {...} at both ends: that is a "json" line.
            if not (piece.startswith(b"{") and piece.endswith(b"}")):
                return piece + b"\n"
    if kind == "utf8":
        return b'{"v":1,"note":"\xff\xfe bad"}\n'
    if kind == "json":
        return good.replace(b",", b",,", 1) + b"\n"
    if kind == "overlong":
        return b'{"v":1,"pad":"' + b"x" * rng.randint(4100, 9000) + b'"}\n'
    if kind == "missing_keys":
        obj = sample_obj(1, 2)
        del obj[rng.choice(["seq", "ms", "st"])]
        return json.dumps(obj).encode() + b"\n"
    if kind == "nan":
        return good.replace(b'"W":10.4', b'"W":NaN', 1) + b"\n"
    if kind == "unsupported_version":
        return good.replace(b'"v":1', b'"v":2', 1) + b"\n"
    raise ValueError(kind)


KINDS = ("garbage", "partial", "utf8", "json", "overlong", "missing_keys", "nan", "unsupported_version")


@dataclass
class Script:
    """A byte stream of valid and bad lines, with what the driver must make of it."""

    data: bytes
    good: list[int]  # seq of every valid sample, in order
    bad: Counter[str] = field(default_factory=Counter)


def mixed_stream(n_lines: int, bad_fraction: float, seed: int = 7) -> Script:
    rng = random.Random(seed)
    parts: list[bytes] = []
    good: list[int] = []
    bad: Counter[str] = Counter()
    seq, ms = 1000, 5000
    for _ in range(n_lines):
        if rng.random() < bad_fraction:
            kind = KINDS[len(parts) % len(KINDS)] if rng.random() < 0.5 else rng.choice(KINDS)
            parts.append(bad_line(kind, rng))
            bad[kind] += 1
        else:
            parts.append(sample_line(seq, ms, wh=seq / 1000))
            good.append(seq)
            seq += 1
            ms += 100
    return Script(b"".join(parts), good, bad)


class ScriptedPty:
    """A real pty whose master side the test writes; the driver opens ``port`` (a stable symlink)."""

    def __init__(self, dir: Path, name: str = "ttyTEST0") -> None:
        self.link = dir / name
        self.master: int | None = None
        self.slave: int | None = None

    @property
    def port(self) -> str:
        return str(self.link)

    def plug(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        self.master, self.slave = master, slave
        tmp = self.link.with_name(self.link.name + ".new")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(os.ttyname(slave), tmp)
        os.replace(tmp, self.link)

    def unplug(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.link.unlink()
        for fd in (self.master, self.slave):
            if fd is not None:
                os.close(fd)
        self.master = self.slave = None

    async def write(self, data: bytes, chunk: tuple[int, int] = (1, 3000), seed: int = 3,
                    timeout: float = 20.0) -> None:
        """Write ``data`` in random-sized chunks (lines straddle writes), waiting while the pty is full."""
        assert self.master is not None
        rng = random.Random(seed)
        view = memoryview(data)
        pos = 0
        deadline = time.monotonic() + timeout
        while pos < len(view):
            n = rng.randint(*chunk)
            try:
                pos += os.write(self.master, view[pos:pos + n])
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError("the driver stopped reading the pty") from None
                await asyncio.sleep(0.002)


class Collector:
    """Consumes a meter's events in a task; tests wait on conditions over what arrived."""

    def __init__(self, meter: EpiMeter) -> None:
        self.meter = meter
        self.events: list[MeterEvent] = []
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        async for ev in self.meter.events():
            self.events.append(ev)

    def of(self, tp: type) -> list:
        return [e for e in self.events if isinstance(e, tp)]

    @property
    def samples(self) -> list[MeterSample]:
        return self.of(MeterSample)

    async def until(self, cond, timeout: float = 5.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; status: {self.meter.status()}")
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        await self.meter.close()
        await asyncio.wait_for(self._task, 5)


@contextlib.asynccontextmanager
async def open_meter(port: str, **kw) -> AsyncIterator[tuple[EpiMeter, Collector]]:
    meter = EpiMeter(port, **kw)
    await meter.start()
    col = Collector(meter)
    try:
        yield meter, col
    finally:
        await col.close()


class FreezableClock(SimClock):
    """The lab's virtual clock, which a test can stop so the simulated meter goes quiet and can be drained."""

    def __init__(self, scale: float) -> None:
        super().__init__(scale)
        self._frozen: float | None = None
        self._shift = 0.0

    def now(self) -> float:
        if self._frozen is not None:
            return self._frozen
        return super().now() - self._shift

    def freeze(self) -> None:
        self._frozen = self.now()

    def thaw(self) -> None:
        assert self._frozen is not None
        self._shift = super().now() - self._frozen  # resume where it stopped, no jump
        self._frozen = None
