"""The simulated epi-meter on a real pty, read by the real driver."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from drivers.epimeter import MeterGap, MeterInfo, MeterState
from epiconsole.config import sim_defaults
from epiconsole.sim.meter import SimMeter
from epiconsole.sim.state import SimLab
from tests.meter_fixtures import Collector, FreezableClock, open_meter

SCALE = 60.0


def make_lab() -> SimLab:
    cfg = sim_defaults()
    assert cfg.sim.time_scale == SCALE
    return SimLab(cfg, FreezableClock(SCALE))


async def drain(sim: SimMeter, col: Collector) -> None:
    """Stop the lab clock and wait until every queued sample line has reached the driver."""
    sim.lab.clock.freeze()
    await asyncio.sleep(2 * 0.015)
    last = sim.emitted.recent[-1][0]
    await col.until(lambda: bool(col.samples) and col.samples[-1].seq == last, 5, "the driver to drain")
    assert col.meter.status().samples == sim.emitted.sample_lines  # every line written was delivered


async def test_samples_flow_energy_integrates_and_the_clock_fit_finds_the_time_scale(tmp_path) -> None:
    lab = make_lab()
    sim = SimMeter(lab, 10.0, tmp_path)
    port = await sim.start()
    assert port == str(tmp_path / "ttyEPI0")
    try:
        async with open_meter(port) as (meter, col):
            await meter.wait_connected(3)
            await asyncio.sleep(2.5)
            await drain(sim, col)
            st = meter.status()
            s = col.samples
            assert len(s) > 800  # 10 Hz device rate * 60x scale = 600 lines per real second
            assert st.bad_total == 0
            # Nothing lost unless the board's buffer overflowed while this 2-core machine was busy.
            assert st.lost == sim.emitted.dropped_unread
            # Energy counters never go backwards, and the last line's counters are the board's own.
            for ch in range(4):
                wh = [x.channels[ch].Wh for x in s]
                assert all(a <= b for a, b in zip(wh, wh[1:], strict=False))
            seq, ms, wh_last = sim.emitted.recent[-1]
            assert (s[-1].seq, s[-1].ms) == (seq, ms)
            assert tuple(c.Wh for c in s[-1].channels) == wh_last
            # Wh differences over device time give the physics model's idle wall power.
            dt_h = (s[-1].ms - s[0].ms) / 3_600_000
            for ch in range(4):
                watts = (s[-1].channels[ch].Wh - s[0].channels[ch].Wh) / dt_h
                assert watts == pytest.approx(lab.physics.true_watts(ch, False, False, None), rel=0.01)
            # The device clock runs 60x fast: the fit's slope is 1/60 host seconds per device second.
            # On a starved CPU the writer sends in late bursts, which tilts a short fit by several
            # percent; 15 % still tells 60x from any other scale.
            assert st.clock_slope * SCALE == pytest.approx(1.0, rel=0.15)
            assert st.clock_residual < 0.05
            # Mapped times track receive times (which are only ever late).
            late = [x.host_time - x.t for x in s[-200:]]
            assert min(late) > -0.01 and sorted(late)[len(late) // 2] < 0.1
            infos = col.of(MeterInfo)
            assert infos and infos[0].simulated and infos[0].fw.endswith("-sim")
    finally:
        await sim.stop()
    assert not (tmp_path / "ttyEPI0").exists()


async def test_info_and_rate_commands_are_answered(tmp_path) -> None:
    lab = make_lab()
    sim = SimMeter(lab, 10.0, tmp_path)
    port = await sim.start()
    try:
        async with open_meter(port) as (meter, col):
            await meter.wait_connected(3)
            info = await meter.info(2)
            assert (info.rate_hz, info.channels, info.simulated, info.serial) == (10.0, 4, True, "EM-SIM-0001")
            await meter.set_rate(20, 2)
            assert (await meter.info(2)).rate_hz == 20.0
            n0 = len(col.samples)
            await col.until(lambda: len(col.samples) > n0 + 50, 3, "samples at the new rate")
            tail = col.samples[-30:]
            assert {b.ms - a.ms for a, b in zip(tail, tail[1:], strict=False)} == {50}
            bad = await meter.command("rate", 2, hz=99)
            assert not bad.ok and "1 to 50" in bad.error
            assert not (await meter.command("selfdestruct", 2)).ok
            with pytest.raises(ValueError):
                await meter.set_rate(0.5)
            assert sim.rate_hz == 20.0
    finally:
        await sim.stop()


async def test_fault_switches_take_effect(tmp_path) -> None:
    lab = make_lab()
    lab.faults.garbage_fraction = 0.2
    lab.faults.lost_line_fraction = 0.1
    sim = SimMeter(lab, 10.0, tmp_path)
    port = await sim.start()
    try:
        async with open_meter(port, reconnect_max_s=0.3) as (meter, col):
            await meter.wait_connected(3)
            await asyncio.sleep(1.0)
            await drain(sim, col)
            st = meter.status()
            em = sim.emitted
            assert em.garbage_lines > 50 and em.lost_on_purpose > 25
            assert st.bad["garbage"] == st.bad_total == em.garbage_lines
            written = [seq for seq, _, _ in em.recent]
            assert [x.seq for x in col.samples] == written
            skipped = sum(b - a - 1 for a, b in zip(written, written[1:], strict=False))
            assert st.lost == skipped and st.gaps == len(col.of(MeterGap)) > 0
            assert em.lost_on_purpose + em.dropped_unread - 3 <= skipped <= em.lost_on_purpose + em.dropped_unread
            lab.clock.thaw()
            lab.faults.garbage_fraction = lab.faults.lost_line_fraction = 0.0

            # Unplug through the fault switch: the port vanishes, then comes back behind the same path.
            lab.faults.meter_unplugged = True
            await col.until(lambda: not meter.connected, 3, "the disconnect")
            await asyncio.sleep(0.4)
            lab.faults.meter_unplugged = False
            t_plug = time.monotonic()
            await col.until(lambda: meter.connected, 2, "the reconnect")
            assert time.monotonic() - t_plug < 2.0
            await col.until(lambda: any(g.cause == "unplug" for g in col.of(MeterGap)), 3, "the unplug gap")
            gap = next(g for g in col.of(MeterGap) if g.cause == "unplug")
            assert gap.lost >= em.unplugged_ticks > 0 and gap.t1 - gap.t0 > 0.4
            assert [e.connected for e in col.of(MeterState)][:3] == [True, False, True]

            # Reboot through the fault switch: uptime, seq and energy restart; the info line comes again.
            infos = len(col.of(MeterInfo))
            lab.faults.meter_reboot_requested = True
            await col.until(lambda: meter.status().reboots == 1, 3, "the reboot")
            assert not lab.faults.meter_reboot_requested and em.reboots == 1
            await col.until(lambda: len(col.of(MeterInfo)) > infos, 3, "the info line after boot")
            gap = col.of(MeterGap)[-1]
            assert gap.cause == "reboot"
            first = next(x for x in col.samples if x.t >= gap.t1)
            assert first.ms < 1000 and all(c.Wh < 0.01 for c in first.channels)
            await col.until(lambda: col.samples[-1].t > gap.t1 + 0.2, 3, "samples after the reboot")
            ts = [x.t for x in col.samples]
            assert all(b >= a for a, b in zip(ts, ts[1:], strict=False))  # mapped time never runs back
    finally:
        await sim.stop()


async def test_scheduled_unplug_and_reboot_from_the_config(tmp_path) -> None:
    cfg = sim_defaults()
    # Lab seconds: unplugged 0.6 s after the clock starts, replugged 0.5 s later, rebooted 1.4 s after that
    # (time enough for the driver to reconnect first, even on a loaded machine).
    faults = dataclasses.replace(cfg.sim.faults, meter_unplug_at_s=36.0, meter_unplug_for_s=30.0,
                                 meter_reboot_at_s=150.0)
    lab = SimLab(dataclasses.replace(cfg, sim=dataclasses.replace(cfg.sim, faults=faults)), FreezableClock(SCALE))
    lab.clock.freeze()  # lab time stands still until the driver is connected and heard the board
    sim = SimMeter(lab, 10.0, tmp_path)
    port = await sim.start()
    try:
        async with open_meter(port, reconnect_max_s=0.2) as (meter, col):
            await meter.wait_connected(5)
            await col.until(lambda: bool(col.of(MeterInfo)), 5, "the info line")
            lab.clock.thaw()
            await col.until(lambda: meter.status().reboots == 1, 10, "the scheduled reboot")
            assert (sim.emitted.unplugs, sim.emitted.reboots) == (1, 1)
            assert [g.cause for g in col.of(MeterGap)] == ["unplug", "reboot"]
            assert [e.connected for e in col.of(MeterState)] == [True, False, True]
            await asyncio.sleep(0.3)
            assert (sim.emitted.unplugs, sim.emitted.reboots) == (1, 1)  # once each
    finally:
        await sim.stop()
