"""Meter benchmark: how many protocol lines per second the epi-meter driver takes.

Three figures, each on the same realistic 4-channel lines (as the simulated board writes them):

* ``parse``: the pure :func:`drivers.epimeter.parse_line`, one line at a time;
* ``driver``: framing + parsing + gap/reboot detection + clock fit + event queue, fed in 1 KiB chunks
  (the serial transport's read size) without I/O;
* ``pty``: end to end through a real pseudo-terminal: a writer thread pushes the lines into the
  master as fast as the pty takes them, :class:`~drivers.epimeter.EpiMeter` reads the slave and a
  consumer takes every :class:`~drivers.epimeter.MeterSample` from ``events()``.

Also reported, not gated: the simulated meter's own tick rate (physics + JSON per tick).

Each figure is lines per second of this process's CPU time (``time.process_time``: the driver's
capacity, which other work on a shared machine does not change) and, beside it, per wall-clock second.

Target (issue "Drivers and the simulated lab"): >= 10,000 lines per CPU second for ``parse`` and
``pty``, 200x the board's top rate of 50 lines/s. Exits 1 if either is below. Prints figures and one
JSON line.

    .venv/bin/python bench/meter.py [--lines 50000] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import threading
import time
import tty
from dataclasses import dataclass
from pathlib import Path

from drivers.epimeter import EpiMeter, MeterSample, SampleLine, parse_line

TARGET_LINES_PER_S = 10_000


def make_lines(n: int, seed: int = 1) -> list[bytes]:
    """Lines shaped like the simulated board's: rounded V/A/W/VAR/PF/Hz, full-precision Wh."""
    rng = random.Random(seed)
    wh = [0.0] * 4
    out = []
    for i in range(n):
        chans = []
        for ch in range(4):
            w = 3.6 + rng.gauss(0, 0.06)
            wh[ch] += w * 0.1 / 3600
            chans.append({"id": ch, "V": round(229.8 + rng.gauss(0, 0.3), 2), "A": round(w / 0.55 / 229.8, 5),
                          "W": round(w, 3), "VAR": round(w * 1.52, 3), "PF": 0.55,
                          "Hz": round(50 + rng.gauss(0, 0.002), 3), "Wh": wh[ch]})
        obj = {"v": 1, "seq": i, "ms": i * 100, "st": 0, "ch": chans}
        out.append(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
    return out


@dataclass(frozen=True)
class Rate:
    cpu: float  # lines per CPU second of this process
    wall: float  # lines per wall-clock second


class Timer:
    def __enter__(self) -> Timer:
        self.c0, self.w0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu = time.process_time() - self.c0
        self.wall = time.perf_counter() - self.w0

    def rate(self, n: int) -> Rate:
        return Rate(n / self.cpu, n / self.wall)


def best(rates: list[Rate]) -> Rate:
    return Rate(max(r.cpu for r in rates), max(r.wall for r in rates))


def bench_parse(lines: list[bytes]) -> Rate:
    stripped = [ln[:-1] for ln in lines]
    with Timer() as tm:
        for ln in stripped:
            r = parse_line(ln)
    assert type(r) is SampleLine
    return tm.rate(len(lines))


def bench_driver(lines: list[bytes]) -> Rate:
    data = b"".join(lines)
    meter = EpiMeter("/nonexistent", queue_size=len(lines) + 10)
    with Timer() as tm:
        for i in range(0, len(data), 1024):
            meter._on_data(data[i:i + 1024])  # what the transport's data_received calls
    st = meter.status()
    assert st.samples == len(lines) and st.bad_total == 0 and st.lost == 0, st
    return tm.rate(len(lines))


async def bench_pty(lines: list[bytes]) -> tuple[Rate, float]:
    """Lines/s end to end, and the clock fit's residual (s) as a sanity figure."""
    data = b"".join(lines)
    master, slave = os.openpty()
    tty.setraw(slave)
    with tempfile.TemporaryDirectory() as d:
        link = Path(d) / "ttyBENCH"
        os.symlink(os.ttyname(slave), link)
        meter = EpiMeter(str(link), queue_size=len(lines) + 10, ask_info=False)
        await meter.start()
        await meter.wait_connected(5)
        await asyncio.sleep(0.05)  # pyserial flushes the input queue while opening
        got = 0

        async def consume() -> None:
            nonlocal got
            async for ev in meter.events():
                if type(ev) is MeterSample:
                    got += 1
                    if got == len(lines):
                        return

        def write() -> None:
            view = memoryview(data)
            pos = 0
            while pos < len(view):
                pos += os.write(master, view[pos:pos + 65536])

        with Timer() as tm:
            writer = threading.Thread(target=write, daemon=True)
            writer.start()
            await asyncio.wait_for(consume(), 120)
        writer.join(10)
        st = meter.status()
        await meter.close()
        os.close(master)
        os.close(slave)
    assert st.samples == len(lines) and st.lost == 0 and st.bad_total == 0, st
    return tm.rate(len(lines)), st.clock_residual


async def bench_sim_ticks(n: int) -> Rate:
    from epiconsole.config import sim_defaults
    from epiconsole.sim.meter import SimMeter
    from epiconsole.sim.state import SimLab

    sim = SimMeter(SimLab(sim_defaults()), 10.0, tempfile.mkdtemp(prefix="epimeter-bench-"))
    with Timer() as tm:
        for i in range(n):
            sim._tick(i / 10.0)  # no host attached: physics and energy, nothing written
    return tm.rate(n)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lines", type=int, default=50_000)
    ap.add_argument("--json", dest="json_out", help="also write the JSON result to this file")
    args = ap.parse_args(argv)

    lines = make_lines(args.lines)
    line_bytes = sum(map(len, lines)) / len(lines)
    parse = best([bench_parse(lines) for _ in range(2)])
    driver = best([bench_driver(lines) for _ in range(2)])
    pty, residual = asyncio.run(bench_pty(lines))
    sim = asyncio.run(bench_sim_ticks(min(args.lines, 5000)))
    ok = parse.cpu >= TARGET_LINES_PER_S and pty.cpu >= TARGET_LINES_PER_S

    print(f"lines: {len(lines):,} of {line_bytes:.0f} bytes (4 channels); lines/s per CPU second (per wall second)")
    print(f"parse_line (pure):              {parse.cpu:>9,.0f}  ({parse.wall:,.0f})")
    print(f"driver in-process (1 KiB feed): {driver.cpu:>9,.0f}  ({driver.wall:,.0f})")
    print(f"end to end through a pty:       {pty.cpu:>9,.0f}  ({pty.wall:,.0f}; {pty.wall * line_bytes / 1e6:.1f} MB/s)")
    print(f"simulated meter ticks:          {sim.cpu:>9,.0f}  ({sim.wall:,.0f}) ticks/s, not gated")
    print(f"target: >= {TARGET_LINES_PER_S:,} lines per CPU second (200x the board's 50 Hz top rate): "
          f"{'PASS' if ok else 'FAIL'}")
    result = {
        "bench": "meter",
        "lines": len(lines),
        "line_bytes": round(line_bytes, 1),
        "parse_lines_per_cpu_s": round(parse.cpu),
        "parse_lines_per_s": round(parse.wall),
        "driver_lines_per_cpu_s": round(driver.cpu),
        "driver_lines_per_s": round(driver.wall),
        "pty_lines_per_cpu_s": round(pty.cpu),
        "pty_lines_per_s": round(pty.wall),
        "pty_clock_residual_s": residual,
        "sim_ticks_per_cpu_s": round(sim.cpu),
        "target_lines_per_s": TARGET_LINES_PER_S,
        "ok": ok,
    }
    text = json.dumps(result)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
