"""Telemetry ingest on real boundaries: protocol lines written into a real pty, read by the real
EpiMeter driver, committed into a real SQLite ledger."""

from __future__ import annotations

import asyncio
import json
import os
import time
import tty

import pytest

from drivers.epimeter import EpiMeter
from epiconsole.ledger import Ledger
from epiconsole.telemetry import Telemetry

CHANNELS = {"0": "pi0", "1": "pi1", "2": "pi2", "3": "pi3"}


class Board:
    """A scripted meter board: writes protocol v1 sample lines into the master side of a pty."""

    def __init__(self, tmp_path) -> None:
        self.master, slave = os.openpty()
        tty.setraw(slave)
        self.slave = slave
        self.port = str(tmp_path / "ttyEPI")
        os.symlink(os.ttyname(slave), self.port)
        self.seq = 0
        self.ms = 0
        self.wh = [0.0] * 4

    def line(self, watts: float = 10.0, dt_ms: int = 100, skip: int = 0) -> bytes:
        self.seq += skip
        self.ms += dt_ms
        chans = []
        for i in range(4):
            self.wh[i] += watts * dt_ms / 1000.0 / 3600.0
            chans.append({"id": i, "V": 230.0, "A": round(watts / 230.0 / 0.9, 5), "W": watts, "VAR": 1.0,
                          "PF": 0.9, "Hz": 50.0, "Wh": self.wh[i]})
        out = json.dumps({"v": 1, "seq": self.seq, "ms": self.ms, "st": 0, "ch": chans}).encode() + b"\n"
        self.seq += 1
        return out

    async def send(self, n: int, rate_hz: float = 200.0, **kw) -> None:
        """Write ``n`` lines at about ``rate_hz`` (in bursts of 10 ms)."""
        per_burst = max(1, int(rate_hz / 100))
        sent = 0
        while sent < n:
            k = min(per_burst, n - sent)
            os.write(self.master, b"".join(self.line(**kw) for _ in range(k)))
            sent += k
            await asyncio.sleep(0.01)

    def close(self) -> None:
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
async def rig(tmp_path):
    board = Board(tmp_path)
    ledger = await Ledger.open(tmp_path / "ledger.sqlite")
    meter = EpiMeter(board.port, reconnect_max_s=0.2)
    await meter.start()
    await meter.wait_connected(5.0)
    telemetry = Telemetry(ledger, meter, CHANNELS, flush_s=0.2, silent_after_s=0.3)
    await telemetry.start()
    yield board, ledger, meter, telemetry
    await telemetry.stop()
    await meter.close()
    await ledger.close()
    board.close()


async def until(cond, timeout=10.0):
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)


async def test_every_sample_is_committed_in_batches_within_250_ms(rig):
    board, ledger, meter, telemetry = rig
    await board.send(600, rate_hz=300)
    await until(lambda: telemetry.stats().committed >= 600)
    block = await ledger.read_samples(0, time.time() + 10)
    assert block.n == 600
    assert sorted(block.seq) == list(range(600))
    assert (block.W[:, :4] == 10.0).all()
    stats = telemetry.stats()
    assert stats.dropped == 0 and stats.gaps == 0
    assert stats.flushes < 60  # batched: about one commit per 200 ms, not one per line
    # The oldest tick of a batch waits at most one flush period (+ scheduling) before it is committed.
    assert stats.max_lag_s < 0.6
    assert await telemetry.wait_committed(float(block.t[-1]), timeout=1.0)


async def test_gaps_are_recorded_with_their_cause(rig):
    board, ledger, meter, telemetry = rig
    await board.send(20)
    os.write(board.master, board.line(skip=5))  # five lines lost on the wire
    await board.send(20)
    await asyncio.sleep(0.6)  # the board falls silent (port open, nothing sent)
    await board.send(20)
    await until(lambda: telemetry.stats().committed >= 61)
    await telemetry.flush()
    gaps = await ledger.gaps()
    causes = [g.cause for g in gaps]
    assert causes == ["seq_jump", "silent"], causes
    assert gaps[0].data == {"lost": 5}
    assert gaps[1].t1 - gaps[1].t0 > 0.3
    events = [e.kind for e in await ledger.events_after(0)]
    assert events.count("meter.gap") == 2


async def test_live_figures_and_window_energy(rig):
    board, ledger, meter, telemetry = rig
    await board.send(50, watts=8.0)
    await until(lambda: telemetry.stats().received >= 50)
    telemetry.window_begin(time.time() - 60)  # opens before the next sample
    await board.send(101, watts=12.0, dt_ms=100)
    await until(lambda: telemetry.stats().received >= 151)
    figures = telemetry.node_figures()
    assert set(figures) == {"pi0", "pi1", "pi2", "pi3"}
    assert figures["pi2"]["W"] == 12.0 and figures["pi2"]["channel"] == 2
    assert 8.0 <= figures["pi2"]["W_mean_10s"] <= 12.0
    assert figures["pi0"]["recent"] and figures["pi0"]["recent"][-1][1] in (8.0, 12.0)
    # 100 intervals of 0.1 s at 12 W on 4 channels, from the energy counters.
    assert telemetry.window_joules() == pytest.approx(4 * 12.0 * 10.0, rel=1e-6)
    telemetry.window_end()
    assert telemetry.window_joules() is None


async def test_meter_unplug_is_logged_and_silence_is_measured(rig):
    board, ledger, meter, telemetry = rig
    await board.send(10)
    await until(lambda: telemetry.stats().received >= 10)
    assert telemetry.silent_s() < 1.0
    os.unlink(board.port)  # the device node vanishes, as on a USB unplug
    await until(lambda: not meter.connected, timeout=5)
    await telemetry.flush()
    kinds = [e.kind for e in await ledger.events_after(0)]
    assert "meter.disconnected" in kinds
    await asyncio.sleep(0.4)
    assert telemetry.silent_s() > 0.3
