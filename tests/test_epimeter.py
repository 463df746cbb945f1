"""The epi-meter driver: the pure parser, the framer, the clock fit, and the port on a real pty."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.epimeter import (
    BAD_KINDS,
    MAX_LINE,
    BadLine,
    ClockFit,
    CommandAnswer,
    EpiMeter,
    LineFramer,
    MeterGap,
    MeterInfo,
    MeterNotConnected,
    MeterSample,
    MeterState,
    MeterTimeout,
    SampleLine,
    parse_line,
)
from tests.meter_fixtures import (
    KINDS,
    ScriptedPty,
    bad_line,
    mixed_stream,
    open_meter,
    sample_line,
    sample_obj,
)

# -- parser ----------------------------------------------------------------------------------------


def test_parse_sample_line_exactly() -> None:
    r = parse_line(sample_line(18234, 912345, wh=12.34567, st=2).rstrip(b"\n"))
    assert isinstance(r, SampleLine)
    assert (r.seq, r.ms, r.st, len(r.channels)) == (18234, 912345, 2, 4)
    c = r.channels[1]
    assert (c.id, c.V, c.A, c.W, c.VAR, c.PF, c.Hz, c.Wh) == (1, 229.8, 0.053, 11.4, 2.1, 0.91, 50.01, 13.34567)


@pytest.mark.parametrize("kind", KINDS)
def test_each_bad_kind_is_classified(kind: str) -> None:
    rng = random.Random(kind)
    for _ in range(20):
        r = parse_line(bad_line(kind, rng).rstrip(b"\n"))
        assert r == BadLine(kind)


def test_missing_channel_field_is_nan_and_unknown_keys_are_ignored() -> None:
    obj = sample_obj(1, 2)
    del obj["ch"][0]["VAR"]
    obj["ch"][1]["PF"] = None
    obj["future_key"] = {"x": 1}
    obj["ch"][2]["THD"] = 3.0
    r = parse_line(json.dumps(obj).encode())
    assert isinstance(r, SampleLine)
    assert math.isnan(r.channels[0].VAR) and math.isnan(r.channels[1].PF)
    assert r.channels[2].PF == 0.91


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        (b"", "garbage"),
        (b"   \r", "garbage"),
        (b"[1,2]", "garbage"),
        (b'{"v":1,"seq":1,"ms":2,"st":0,"ch":[{"id":0,"W":1e999}]}', "nan"),
        (b'{"v":1,"seq":1,"ms":2,"st":0,"ch":[{"id":0,"W":-Infinity}]}', "nan"),
        (b'{"v":1,"seq":1,"ms":2,"st":0,"ch":[{"id":0,"W":"10"}]}', "missing_keys"),
        (b'{"v":1,"seq":-1,"ms":2,"st":0,"ch":[]}', "missing_keys"),
        (b'{"v":1,"seq":4294967296,"ms":2,"st":0,"ch":[]}', "missing_keys"),
        (b'{"v":1,"seq":1,"ms":2,"st":0,"ch":[{"V":1}]}', "missing_keys"),
        (b'{"seq":1,"ms":2,"st":0,"ch":[]}', "missing_keys"),
        (b'{"v":"1","seq":1}', "missing_keys"),
        (b'{"v":1}', "missing_keys"),
        (b'{"v":3,"info":{}}', "unsupported_version"),
        (b'{"v":1,"ok":"yes","cmd":"rate"}', "missing_keys"),
        (b"{}", "missing_keys"),
        (b'{"v":1,"seq":1', "partial"),
        (b'":2}', "partial"),
        (b"{nope}", "json"),
        (b"{\xff\xfe", "utf8"),
        (b"\xff\xfe{", "garbage"),
        (b"{" + b" " * MAX_LINE + b"}", "overlong"),
    ],
)
def test_edge_lines(line: bytes, kind: str) -> None:
    assert parse_line(line) == BadLine(kind)


def test_info_and_answers() -> None:
    info = parse_line(b'{"v":1,"info":{"board":"epi-meter","fw":"1.0.0","serial":"EM-0007","channels":4,'
                      b'"rate_hz":10,"cal_date":"2026-05-01","ct":"SCT-013-005","uncertainty_pct":1.0}}')
    assert isinstance(info, MeterInfo)
    assert (info.serial, info.channels, info.rate_hz, info.ct, info.simulated) == ("EM-0007", 4, 10.0, "SCT-013-005", False)
    assert parse_line(b'{"v":1,"ok":true,"cmd":"rate"}') == CommandAnswer("rate", True, "")
    assert parse_line(b'{"v":1,"ok":false,"cmd":"rate","error":"too fast"}') == CommandAnswer("rate", False, "too fast")


# -- framer and clock fit --------------------------------------------------------------------------


def test_framer_caps_lines_and_resyncs_at_the_next_newline() -> None:
    f = LineFramer(max_line=10)
    out = f.feed(b"abc\n0123456789\n01234567890\nxy")
    assert out == [b"abc", b"0123456789"] and f.overlong == 1
    out = f.feed(b"z" * 20)  # an overlong line still open across feeds is counted once
    assert out == [] and f.overlong == 2
    out = f.feed(b"zzz\nok\n")
    assert out == [b"ok"] and f.overlong == 2
    f.feed(b"half")
    assert f.reset() is True and f.reset() is False


def test_framer_any_split_gives_the_same_lines() -> None:
    data = mixed_stream(300, 0.3).data
    whole = LineFramer()
    expect = whole.feed(data)
    rng = random.Random(1)
    for _ in range(5):
        f, got, pos = LineFramer(), [], 0
        while pos < len(data):
            n = rng.randint(1, 700)
            got += f.feed(data[pos:pos + n])
            pos += n
        assert got == expect and f.overlong == whole.overlong


def test_clock_fit_recovers_fast_device_clock_under_late_jitter() -> None:
    rng = random.Random(5)
    fit = ClockFit()
    slope, origin = 1 / 60, 1_700_000_000.0
    for i in range(3000):
        d = i * 0.1  # device seconds at 10 Hz
        # Receive times are only ever late: batching (0-15 ms) plus scheduling spikes.
        late = rng.uniform(0, 0.015) + (rng.expovariate(1 / 0.02) if rng.random() < 0.05 else 0)
        fit.add(d, origin + slope * d + late)
    assert fit.slope * 60 == pytest.approx(1.0, rel=2e-3)
    # The lower envelope sits on the earliest arrivals: within a few ms of the true line.
    assert 0 <= fit.map(100.0) - (origin + slope * 100.0) < 0.004
    assert 0.002 < fit.residual < 0.02
    fit.restart()
    assert fit.points == 0 and fit.slope * 60 == pytest.approx(1.0, rel=2e-3)  # the crystal did not change


def _batched(fit: ClockFit, n: int, d0: float, origin: float, rng: random.Random) -> list[float]:
    """The simulated lab's pattern: 600 lines per host second (10 Hz device rate, 60x clock) arriving in
    15 ms batches, every line of a batch with the same receive time."""
    out = []
    for i in range(n):
        d = d0 + i / 10
        h = ((origin + d / 60) // 0.015 + 1) * 0.015 + rng.uniform(0, 0.002)
        out.append(fit.add(d, h))
    return out


def test_clock_fit_is_monotonic_and_keeps_its_slope_across_a_restart() -> None:
    rng = random.Random(11)
    fit = ClockFit()
    origin = 1_700_000_000.0
    before = _batched(fit, 3000, 0.0, origin, rng)
    assert fit.slope * 60 == pytest.approx(1.0, rel=5e-3)
    fit.restart()  # a reboot: device time starts again at 0, host time goes on
    after, slopes = [], []
    for i in range(600):
        after += _batched(fit, 1, i / 10, origin + 400.0, rng)
        slopes.append(fit.slope * 60)
    # A slope fitted on the new boot's first batch or two would be far off; the old one is kept.
    assert min(slopes) == pytest.approx(1.0, rel=5e-3) and max(slopes) == pytest.approx(1.0, rel=5e-3)
    ts = before + after
    assert all(b >= a for a, b in zip(ts, ts[1:], strict=False))  # refits never move time backwards


# -- the port on a real pty ------------------------------------------------------------------------


async def test_10k_lines_with_bad_lines_mixed_in_deliver_every_good_line_in_order(tmp_path) -> None:
    script = mixed_stream(10_000, 0.15)
    assert sum(script.bad.values()) >= 1000 and all(script.bad[k] > 0 for k in KINDS)
    pty = ScriptedPty(tmp_path)
    pty.plug()
    try:
        async with open_meter(pty.port) as (meter, col):
            await meter.wait_connected(3)
            await pty.write(script.data)
            total = len(script.good)
            await col.until(lambda: meter.status().samples == total, 20, "all samples")
            await asyncio.sleep(0.05)
            st = meter.status()
            assert [s.seq for s in col.samples] == script.good
            assert st.bad == {k: script.bad[k] for k in BAD_KINDS}
            assert (st.samples, st.good, st.lost, st.gaps, st.reboots) == (total, total, 0, 0, 0)
            assert not col.of(MeterGap)
            assert all(s.channels[2].Wh == s.seq / 1000 + 2 for s in col.samples)
    finally:
        pty.unplug()


async def test_seq_jump_wrap_and_reboot(tmp_path) -> None:
    pty = ScriptedPty(tmp_path)
    pty.plug()
    w = 1 << 32
    # seq and ms wrap through 2**32 (at different ticks): no gap, no reboot, time keeps going.
    lines = [sample_line((w - 3 + i) % w, (w - 250 + 100 * i) % w, wh=1 + i) for i in range(6)]  # seq ..2
    lines += [sample_line(8 + i, 1000 + 100 * i, wh=10 + i) for i in range(3)]  # seq 3..7 lost
    lines += [sample_line(0, 5, wh=0.0), sample_line(1, 105, wh=0.001)]  # reboot: seq, ms and Wh restart
    lines += [sample_line(2, 205, wh=0.0005)]  # Wh backwards while ms and seq go on: a reboot too
    try:
        async with open_meter(pty.port) as (meter, col):
            await meter.wait_connected(3)
            await pty.write(b"".join(lines))
            await col.until(lambda: len(col.samples) == 12, 5, "12 samples")
            gaps = col.of(MeterGap)
            assert [(g.cause, g.lost) for g in gaps] == [("seq_jump", 5), ("reboot", 0), ("reboot", 0)]
            s = col.samples
            assert (gaps[0].t0, gaps[0].t1) == (s[5].t, s[6].t)
            assert (gaps[1].t0, gaps[1].t1) == (s[8].t, s[9].t)
            st = meter.status()
            assert (st.lost, st.reboots, st.gaps, st.samples) == (5, 2, 3, 12)
    finally:
        pty.unplug()


async def test_unplug_and_replug_behind_the_stable_path(tmp_path) -> None:
    pty = ScriptedPty(tmp_path)
    pty.plug()
    async with open_meter(pty.port, reconnect_max_s=0.5) as (meter, col):
        await meter.wait_connected(3)
        await pty.write(b"".join(sample_line(i, 100 * i) for i in range(20)) + b'{"v":1,"seq":20,"ms"')
        await col.until(lambda: len(col.samples) == 20, 5, "20 samples")
        pty.unplug()
        await col.until(lambda: len(col.of(MeterState)) == 2, 3, "the disconnect")
        assert not meter.connected and not col.of(MeterState)[-1].connected
        with pytest.raises(MeterNotConnected):
            await meter.info(0.5)
        await asyncio.sleep(0.7)  # unplugged for a while: backoff reaches its cap
        pty.plug()
        t_plug = time.monotonic()
        await col.until(lambda: meter.connected, 2, "the reconnect within 2 s")
        reconnect_s = time.monotonic() - t_plug
        await pty.write(b"".join(sample_line(i, 100 * i) for i in range(30, 40)))
        await col.until(lambda: len(col.samples) == 30, 5, "samples after replug")
        gaps = col.of(MeterGap)
        assert len(gaps) == 1 and gaps[0].cause == "unplug" and gaps[0].lost == 10
        assert (gaps[0].t0, gaps[0].t1) == (col.samples[19].t, col.samples[20].t)
        st = meter.status()
        assert (st.reconnects, st.lost, st.bad["partial"], st.connected) == (1, 10, 1, True)
        assert [e.reason for e in col.of(MeterState)][::2] == ["opened", "reconnected"]
        assert reconnect_s < 2.0
    pty.unplug()


async def test_a_reboot_while_unplugged_is_seen_from_the_device_clock(tmp_path) -> None:
    pty = ScriptedPty(tmp_path)
    pty.plug()
    async with open_meter(pty.port, reconnect_max_s=0.2, reboot_lag_s=0.5) as (meter, col):
        await meter.wait_connected(3)
        await pty.write(b"".join(sample_line(i, 100 * i, wh=1 + i) for i in range(20)))  # 1.9 s of uptime
        await col.until(lambda: len(col.samples) == 20, 5, "20 samples")
        pty.unplug()
        await col.until(lambda: not meter.connected, 5, "the disconnect")
        await asyncio.sleep(1.5)
        pty.plug()
        await meter.wait_connected(5)
        # The board restarted while unplugged and is 2.5 s up: seq, ms and Wh are all past the old
        # values, but only 0.6 s of device time passed for 1.5+ s of host time.
        await pty.write(b"".join(sample_line(i, 100 * i, wh=30 + i) for i in range(25, 30)))
        await col.until(lambda: len(col.samples) == 25, 5, "samples after replug")
        st = meter.status()
        assert (st.reboots, st.lost) == (1, 25)  # seq restarted at 0: lines 0..24 of this boot never came
        gap = col.of(MeterGap)[-1]
        assert (gap.cause, gap.lost) == ("unplug", 25)
        # Dated by the new boot's own fit (its receive time), not seconds in the past by the old one.
        first = col.samples[20]
        assert first.t == pytest.approx(first.host_time, abs=0.05) and gap.t1 - gap.t0 > 1.4
    pty.unplug()


async def test_port_that_is_not_there_yet_and_commands_time_out(tmp_path) -> None:
    pty = ScriptedPty(tmp_path)
    async with open_meter(pty.port, reconnect_max_s=0.2) as (meter, col):
        with pytest.raises(MeterTimeout, match="did not open"):
            await meter.wait_connected(0.3)
        assert "No such file" in meter.status().last_error
        pty.plug()
        await meter.wait_connected(2)
        with pytest.raises(MeterTimeout, match="did not answer 'info'"):
            await meter.info(0.2)  # nobody answers on the scripted side
        # One asked on connect (ask_info), one by the call.
        assert os.read(pty.master, 100) == b'{"cmd":"info"}\n' * 2
        with pytest.raises(ValueError, match="between 1 and 50"):
            await meter.set_rate(60)
    pty.unplug()



@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=700) | st.builds(lambda b: b"{" + b + b"}", st.binary(max_size=300)))
def test_parse_line_never_raises(line: bytes) -> None:
    r = parse_line(line)
    assert isinstance(r, SampleLine | MeterInfo | CommandAnswer) or r.kind in BAD_KINDS


async def test_a_slow_consumer_loses_the_oldest_events_counted(tmp_path) -> None:
    pty = ScriptedPty(tmp_path)
    pty.plug()
    meter = EpiMeter(pty.port, queue_size=50, ask_info=False)  # nobody consumes events()
    await meter.start()
    try:
        await meter.wait_connected(3)
        await pty.write(b"".join(sample_line(i, 100 * i) for i in range(200)))
        deadline = time.monotonic() + 5
        while meter.status().samples < 200 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert meter.status().dropped_events == 200 + 1 - 50  # +1: the "opened" state event
        t0 = meter.status().last_sample_host_time
        await meter.close()
        events = [ev async for ev in meter.events()]
        seqs = [ev.seq for ev in events if isinstance(ev, MeterSample)]
        assert seqs[-1] == 199 and seqs == list(range(200 - len(seqs), 200))
        # The hole is a gap the consumer sees before the first sample after it, never bridged silently.
        gap, first = events[0], events[1]
        assert isinstance(gap, MeterGap) and isinstance(first, MeterSample) and first.seq == seqs[0]
        assert (gap.cause, gap.lost, gap.t1) == ("overflow", seqs[0], first.t) and gap.t0 <= first.t <= t0
        assert meter.status().gaps == 1
        await meter.close()  # idempotent
    finally:
        pty.unplug()


async def test_samples_dropped_after_some_were_taken_make_a_gap_from_the_last_one_taken(tmp_path) -> None:
    pty = ScriptedPty(tmp_path)
    pty.plug()
    meter = EpiMeter(pty.port, queue_size=20, ask_info=False)
    await meter.start()
    try:
        await meter.wait_connected(3)
        events = meter.events()
        await pty.write(b"".join(sample_line(i, 100 * i) for i in range(5)))
        taken = []
        async with asyncio.timeout(10):
            while not (taken and isinstance(taken[-1], MeterSample) and taken[-1].seq == 4):
                taken.append(await anext(events))
        await pty.write(b"".join(sample_line(i, 100 * i) for i in range(5, 100)))  # nobody reads now
        async with asyncio.timeout(10):
            while meter.status().samples < 100:
                await asyncio.sleep(0.01)
        await meter.close()
        rest = [ev async for ev in events]
        gap, first = rest[0], rest[1]
        assert isinstance(gap, MeterGap) and isinstance(first, MeterSample)
        assert (gap.cause, gap.t0, gap.t1) == ("overflow", taken[-1].t, first.t)
        assert gap.lost == first.seq - 5 == meter.status().dropped_events  # seq 5 .. first.seq - 1
        assert [ev.seq for ev in rest[1:] if isinstance(ev, MeterSample)] == list(range(first.seq, 100))
    finally:
        pty.unplug()


async def test_a_late_answer_is_not_taken_for_the_next_commands(tmp_path) -> None:
    pty = ScriptedPty(tmp_path)
    pty.plug()
    async with open_meter(pty.port, ask_info=False) as (meter, _col):
        await meter.wait_connected(3)
        with pytest.raises(MeterTimeout):
            await meter.command("rate", 0.2, hz=20)  # the board is slow to answer this one
        second = asyncio.ensure_future(meter.command("rate", 5, hz=30))
        sent = b""
        async with asyncio.timeout(5):
            while b'"hz":30' not in sent:  # the second command is on the wire
                await asyncio.sleep(0.01)
                with contextlib.suppress(BlockingIOError):
                    sent += os.read(pty.master, 1000)
        # Both answers arrive, in order, with samples racing between them; neither says which call it answers.
        await pty.write(b'{"v":1,"ok":false,"cmd":"rate","error":"late answer to hz=20"}\n'
                        + sample_line(1, 100) + b'{"v":1,"ok":true,"cmd":"rate"}\n')
        assert await asyncio.wait_for(second, 5) == CommandAnswer("rate", True, "")
    pty.unplug()
