"""The ledger on real SQLite files: schema, samples (packing, chunks, cursors, pruning), and the records."""

from __future__ import annotations

import asyncio
import math
import sqlite3

import numpy as np
import pytest

from epiconsole.ledger import (
    BUSY_TIMEOUT_S,
    MAX_CHUNK_SPAN_S,
    PRUNE_MARGIN_S,
    SCHEMA_VERSION,
    Ledger,
    LedgerError,
    SampleBlock,
    SampleCursor,
    tick_dtype,
)

T0 = 1_780_000_000.0


def block(n: int, start: int = 0, rate_hz: float = 10.0, channels: int = 4) -> SampleBlock:
    """Ticks ``start .. start+n`` of a deterministic trace: any split of it concatenates to the whole."""
    i = np.arange(start, start + n)
    c = np.arange(channels)
    t = T0 + i / rate_hz
    grid = i[:, None] * 7 + c[None, :] * 13
    W = 3.0 + (grid % 900) / 100.0  # 3..12 W
    return SampleBlock.from_arrays(
        t,
        seq=i,
        ms=i * 100,
        st=i % 3,
        V=225.0 + (grid % 1000) / 100.0,
        A=np.full((n, channels), 0.05),
        W=np.float32(W).astype(np.float64),
        VAR=np.full((n, channels), 2.5),
        PF=((grid % 2001) - 1000) / 1000.0,
        Hz=np.full((n, channels), 50.01),
        Wh=10.0 + i[:, None] * 0.001 + c[None, :] * 0.0001,
    )


def same(a: SampleBlock, b: SampleBlock) -> bool:
    """Equal to storage resolution (scaled quantities compared within half a step)."""
    if a.n != b.n:
        return False
    tick = all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("t", "seq", "ms", "st"))
    exact = all(np.array_equal(getattr(a, f), getattr(b, f), equal_nan=True) for f in ("W", "VAR", "Wh"))
    with np.errstate(over="ignore"):
        exact = exact and np.array_equal(np.float32(a.A), np.float32(b.A), equal_nan=True)
    close = all(
        np.allclose(getattr(a, f), getattr(b, f), atol=tol, equal_nan=True)
        for f, tol in (("V", 0.005), ("PF", 0.0005), ("Hz", 0.005))
    )
    return tick and exact and close


@pytest.fixture
async def ledger(tmp_path):
    led = await Ledger.open(tmp_path / "ledger.db")
    yield led
    await led.close()


# ----------------------------------------------------------------------------------- schema


async def test_creates_schema_in_wal_mode(tmp_path):
    path = tmp_path / "sub" / "ledger.db"
    async with await Ledger.open(path) as led:
        assert await led.integrity_check() == "ok"
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {
        "campaigns",
        "trials",
        "checkpoints",
        "sample_chunks",
        "gaps",
        "markers",
        "events",
        "commands",
    } <= tables
    db.close()
    # Reopening applies nothing twice.
    async with await Ledger.open(path) as led:
        assert await led.integrity_check() == "ok"


async def test_refuses_newer_schema_and_missing_file(tmp_path):
    path = tmp_path / "ledger.db"
    with pytest.raises(LedgerError, match="No ledger"):
        await Ledger.open(path, readonly=True)
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(LedgerError, match="newer epiconsole"):
        await Ledger.open(path)
    with pytest.raises(LedgerError, match="newer epiconsole"):
        await Ledger.open(path, readonly=True)


async def test_a_file_that_is_not_a_ledger_is_a_one_sentence_error(tmp_path):
    garbage = tmp_path / "notes.txt"
    garbage.write_bytes(b"not sqlite at all " * 300)
    for readonly in (True, False):
        with pytest.raises(LedgerError, match="not a readable epiconsole ledger"):
            await Ledger.open(garbage, readonly=readonly)
    other = tmp_path / "other.sqlite"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY)")
    db.commit()
    db.close()
    with pytest.raises(LedgerError, match="another program"):
        await Ledger.open(other)
    db = sqlite3.connect(other)
    # Refused before anything was written: the other program's file has only its own table.
    assert [r[0] for r in db.execute("SELECT name FROM sqlite_master")] == ["photos"]
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    db.close()
    with pytest.raises(LedgerError, match="is a directory"):
        await Ledger.open(tmp_path)


async def test_readonly_refuses_uninitialised_file_and_writes(tmp_path):
    path = tmp_path / "ledger.db"
    sqlite3.connect(path).close()
    with pytest.raises(LedgerError, match="start the lab service"):
        await Ledger.open(path, readonly=True)
    async with await Ledger.open(path):
        pass
    async with await Ledger.open(path, readonly=True) as viewer:
        with pytest.raises(RuntimeError, match="read-only"):
            await viewer.event("x", "y")
        with pytest.raises(RuntimeError, match="read-only"):
            await viewer.insert_samples(block(3))


# ---------------------------------------------------------------------------------- samples


def test_packing_round_trips_at_storage_resolution():
    b = block(50)
    rec = b.pack()
    assert rec.dtype == tick_dtype(4) and rec.dtype.itemsize == 122
    assert same(SampleBlock.from_bytes(rec.tobytes(), 4), b)
    # Missing channels and values come back as NaN, never 0; out-of-range values saturate.
    W = b.W.copy()
    V = b.V.copy()
    W[3, 1] = np.nan
    V[4, 2] = np.nan
    V[5, 0] = 1e6
    odd = SampleBlock.from_arrays(b.t, seq=b.seq, ms=b.ms, st=b.st, V=V, W=W, PF=b.PF)
    back = SampleBlock.unpack(odd.pack())
    assert math.isnan(back.W[3, 1]) and math.isnan(back.V[4, 2])
    assert back.V[5, 0] == pytest.approx(655.34)
    assert np.isnan(back.Wh).all() and np.isnan(back.A).all()


def ticks_of(b: SampleBlock) -> list[tuple]:
    chans = np.stack([b.V, b.A, b.W, b.VAR, b.PF, b.Hz, b.Wh], axis=2)
    return [
        (
            float(b.t[i]),
            int(b.seq[i]),
            int(b.ms[i]),
            int(b.st[i]),
            [tuple(chans[i, c]) for c in range(b.channels)],
        )
        for i in range(b.n)
    ]


def test_from_ticks_matches_from_arrays_and_checks_shape():
    b = block(7)
    ticks = ticks_of(b)
    built = SampleBlock.from_ticks(ticks)
    assert built.n == 7 and built.channels == 4
    assert same(built, b)
    assert same(SampleBlock.unpack(built.pack()), b)
    ticks[2][4][1] = None  # channel 1 missing from that line
    gap = SampleBlock.from_ticks(ticks)
    for name in ("V", "A", "W", "VAR", "PF", "Hz", "Wh"):
        assert np.isnan(getattr(gap, name)[2, 1])
        assert np.isnan(getattr(SampleBlock.unpack(gap.pack()), name)[2, 1])
    with pytest.raises(ValueError, match="channels"):
        SampleBlock.from_ticks([(T0, 0, 0, 0, [(1.0,) * 7] * 3)])
    with pytest.raises(ValueError, match="numbers"):
        SampleBlock.from_ticks([(T0, 0, 0, 0, [(1.0,) * 6, (1.0,) * 8, (1.0,) * 7, (1.0,) * 7])])
    with pytest.raises(ValueError, match="finite"):
        SampleBlock.from_ticks([(math.nan, 0, 0, 0, [(1.0,) * 7] * 4)])
    with pytest.raises(ValueError, match="numbers"):
        SampleBlock.from_ticks([(T0, 0, 0, 0, [("x",) * 7] * 4)]).pack()
    assert SampleBlock.from_ticks([]).n == 0


def test_packing_from_values_and_from_arrays_agree_byte_for_byte():
    """Small blocks pack straight from the tick values; large ones through arrays: same records."""
    rng = np.random.default_rng(5)
    ticks = []
    specials = [math.nan, math.inf, -math.inf, 1e40, -1e40, 655.345, 655.35, 1e9, -3.0, 0.0, -0.0, 327.675]
    for i in range(300):
        chans = []
        for _c in range(4):
            if rng.random() < 0.05:
                chans.append(None)
                continue
            vals = [230.0 + rng.normal(0, 5), rng.uniform(0, 1), rng.uniform(0, 15), rng.uniform(-5, 5)]
            vals += [rng.uniform(-1, 1), 50 + rng.normal(0, 0.02), 10 + i * 1e-4]
            if rng.random() < 0.2:
                vals[int(rng.integers(0, 7))] = specials[int(rng.integers(0, len(specials)))]
            chans.append(tuple(vals))
        seq = int(rng.integers(-(2**33), 2**33))
        ticks.append((T0 + i * 0.1, seq, seq * 3, int(rng.integers(0, 2**17)), chans))
    lazy = [SampleBlock.from_ticks(ticks[a : a + 30]) for a in range(0, 300, 30)]
    arrays = SampleBlock.from_ticks(ticks)  # over LAZY_MAX_TICKS: built as arrays
    assert type(arrays) is SampleBlock and type(lazy[0]) is not SampleBlock
    assert b"".join(x.pack_bytes() for x in lazy) == arrays.pack_bytes()
    assert same(SampleBlock.concat(lazy), arrays)


async def test_small_commits_read_back_in_order_and_by_time(ledger):
    parts = [block(3, start=3 * k) for k in range(40)]
    for p in parts:
        await ledger.insert_samples(p)
    whole = SampleBlock.concat(parts)
    assert await ledger.sample_count() == whole.n
    assert same(await ledger.read_samples(T0 - 1, T0 + 100), whole)
    window = await ledger.read_samples(T0 + 2.0, T0 + 5.0)
    assert window.t[0] == T0 + 2.0 and window.t[-1] == T0 + 5.0 and window.n == 31
    assert (await ledger.read_samples(T0 + 1000, T0 + 2000)).n == 0
    assert await ledger.sample_span() == (T0, whole.t[-1])
    # Chunks fill to a page and no further: 40 commits of 3 ticks use 4 chunks, not 40 rows.
    rows = await ledger._all("SELECT n FROM sample_chunks ORDER BY id")
    assert [r[0] for r in rows] == [32, 32, 32, 24]


async def test_large_block_splits_into_chunks_and_spans(ledger):
    big = block(5000, rate_hz=10.0)
    await ledger.insert_samples(big)
    rows = await ledger._all("SELECT n, t_last - t_first FROM sample_chunks")
    assert max(r[1] for r in rows) <= MAX_CHUNK_SPAN_S
    assert sum(r[0] for r in rows) == 5000
    # A time gap longer than a chunk may span starts a new chunk, and queries still find everything.
    later = block(10, start=100_000)
    await ledger.insert_samples(later)
    assert same(await ledger.read_samples(later.t[0] - 1, later.t[-1]), later)
    assert same(await ledger.read_samples(T0 + 100, T0 + 200), big.slice_time(T0 + 100, T0 + 200))


async def test_samples_after_follows_commits_incrementally(ledger, tmp_path):
    viewer = await Ledger.open(tmp_path / "ledger.db", readonly=True)
    try:
        cursor = await viewer.sample_cursor_at_end()
        assert cursor == SampleCursor()
        seen = []
        for k in range(30):
            await ledger.insert_samples(block(5, start=5 * k))
            got, cursor = await viewer.samples_after(cursor, max_chunks=2)
            seen.append(got)
        while True:
            got, cursor = await viewer.samples_after(cursor, max_chunks=2)
            if not got.n:
                break
            seen.append(got)
        assert same(SampleBlock.concat(seen), block(150))
        got, again = await viewer.samples_after(cursor)
        assert got.n == 0 and again == cursor
        assert await viewer.sample_cursor_at_end() == cursor
    finally:
        await viewer.close()


async def test_writer_reopen_continues_the_open_chunk(tmp_path):
    path = tmp_path / "ledger.db"
    async with await Ledger.open(path) as led:
        await led.insert_samples(block(5))
    async with await Ledger.open(path) as led:
        await led.insert_samples(block(5, start=5))
        assert [r[0] for r in await led._all("SELECT n FROM sample_chunks")] == [10]
        assert same(await led.read_samples(T0 - 1, T0 + 10), block(10))


async def test_channel_count_change_starts_a_new_chunk(ledger):
    await ledger.insert_samples(block(4, channels=4))
    two = block(3, start=4, channels=2)
    await ledger.insert_samples(two)
    await ledger.insert_samples(block(2, start=7, channels=2))
    everything, _ = await ledger.samples_after(SampleCursor(), max_chunks=1)
    assert everything.channels == 4 and everything.n == 4
    with pytest.raises(ValueError, match="channel counts"):
        await ledger.read_samples(T0 - 1, T0 + 10)
    assert same(
        await ledger.read_samples(T0 + 0.4, T0 + 10), SampleBlock.concat([two, block(2, start=7, channels=2)])
    )


async def test_insert_inside_a_failed_transaction_leaves_no_trace(ledger):
    await ledger.insert_samples(block(4))
    with pytest.raises(RuntimeError, match="boom"):
        async with ledger.transaction():
            await ledger.insert_samples(block(100, start=4))
            await ledger.event("test", "inside")
            raise RuntimeError("boom")
    assert await ledger.sample_count() == 4
    assert await ledger.events_after(0) == []
    await ledger.insert_samples(block(4, start=4))
    assert same(await ledger.read_samples(T0 - 1, T0 + 100), block(8))


async def test_prune_keeps_trial_windows_and_the_open_chunk(ledger):
    cid = await ledger.create_campaign("p", {}, "d", True, {})
    [trial] = await ledger.ensure_trials(cid, [{"config_id": "baseline", "rep": 1}])
    for k in range(200):
        await ledger.insert_samples(block(30, start=30 * k))  # 600 s at 10 Hz
    await ledger.mark(trial.id, "begin", T0 + 200.0)
    await ledger.mark(trial.id, "end", T0 + 220.0)
    deleted = await ledger.prune_samples(T0 + 550.0, keep_ranges=[(T0 + 400.0, T0 + 410.0)])
    assert deleted > 0
    left = await ledger.read_samples(T0 - 1, T0 + 700)
    assert left.n == 6000 - deleted
    for a, b in ((T0 + 200, T0 + 220), (T0 + 400, T0 + 410), (T0 + 550, T0 + 599.9)):
        assert same(left.slice_time(a, b), block(6000).slice_time(a, b))
    assert left.slice_time(T0, T0 + 200 - PRUNE_MARGIN_S - 5).n == 0
    assert left.slice_time(T0 + 300, T0 + 400 - PRUNE_MARGIN_S - 5).n == 0
    assert await ledger.integrity_check() == "ok"


async def test_prune_keeps_the_ticks_that_cover_a_window_end(ledger, tmp_path):
    """A window beginning exactly where a chunk begins still has the tick before it after pruning."""
    cid = await ledger.create_campaign("p", {}, "d", True, {})
    [trial] = await ledger.ensure_trials(cid, [{"config_id": "baseline", "rep": 1}])
    for k in range(100):
        await ledger.insert_samples(block(30, start=30 * k))  # 300 s at 10 Hz
    db = sqlite3.connect(tmp_path / "ledger.db")
    begin = db.execute(
        "SELECT t_first FROM sample_chunks WHERE t_first > ? ORDER BY id LIMIT 1", (T0 + 150.0,)
    ).fetchone()[0]
    db.close()
    await ledger.mark(trial.id, "begin", begin)
    await ledger.mark(trial.id, "end", begin + 20.0)
    await ledger.prune_samples(T0 + 250.0)
    # The window's start is covered: the last tick before it (0.1 s earlier) survived.
    before = (await ledger.read_samples(begin - 0.15, begin - 0.05))
    assert before.n == 1 and same(before, block(3000).slice_time(begin - 0.15, begin - 0.05))


async def test_pruning_everything_old_never_lets_chunk_ids_be_reused(tmp_path):
    path = tmp_path / "ledger.db"
    async with await Ledger.open(path) as led:
        await led.insert_samples(block(640))  # full chunks only: no open chunk is left
        viewer_cursor = await led.sample_cursor_at_end()
        await led.prune_samples(T0 + 10_000.0)
    async with await Ledger.open(path) as led:  # the service restarts
        await led.insert_samples(block(10, start=5000))
    async with await Ledger.open(path, readonly=True) as viewer:
        new, _ = await viewer.samples_after(viewer_cursor)
    assert same(new, block(10, start=5000))


# ------------------------------------------------------------------------------------ records


async def test_gaps(ledger):
    g1 = await ledger.insert_gap(T0, T0 + 2, "seq_jump", data={"lost": 12})
    await ledger.insert_gap(T0 + 10, T0 + 11, "unplug", channel=2)
    with pytest.raises(ValueError):
        await ledger.insert_gap(T0 + 5, T0 + 4, "silent")
    gaps = await ledger.gaps(T0 + 1, T0 + 10.5)
    assert [(g.cause, g.channel) for g in gaps] == [("seq_jump", None), ("unplug", 2)]
    assert gaps[0].id == g1 and gaps[0].data == {"lost": 12}
    assert await ledger.gaps(T0 + 3, T0 + 9) == []


async def test_campaign_trials_checkpoints_and_resume_point(ledger):
    cid = await ledger.create_campaign(
        "pruning", {"reps": 2}, "abc123", True, {"python": "3.11", "nan": float("nan")}
    )
    camp = await ledger.campaign(cid)
    assert camp.plan == {"reps": 2} and camp.simulated and camp.provenance["nan"] is None
    rows = [
        {"config_id": cfg, "rep": rep, "ord": i, "experts": k, "target": tgt}
        for i, (cfg, k, tgt) in enumerate([("baseline", 0, None), ("drop1_all", 1, "all")])
        for rep in (1, 2)
    ]
    trials = await ledger.ensure_trials(cid, rows)
    again = await ledger.ensure_trials(cid, rows)
    assert [t.id for t in trials] == [t.id for t in again] and len(trials) == 4
    assert [(t.config_id, t.rep) for t in trials] == [
        ("baseline", 1),
        ("baseline", 2),
        ("drop1_all", 1),
        ("drop1_all", 2),
    ]
    assert trials[2].experts == 1 and trials[2].target == "all" and trials[0].target is None

    tid = trials[0].id
    stages = ["surgery", "validate", "benchmark", "calculate"]
    assert await ledger.first_unfinished_stage(tid, stages) == "surgery"
    await ledger.checkpoint(tid, "surgery", "started")
    await ledger.checkpoint(tid, "surgery", "done", {"dropped": 0})
    await ledger.checkpoint(tid, "validate", "done")
    await ledger.checkpoint(tid, "benchmark", "started")
    assert await ledger.first_unfinished_stage(tid, stages) == "benchmark"
    await ledger.checkpoint(tid, "benchmark", "discarded", {"why": "meter silent"})
    assert await ledger.first_unfinished_stage(tid, stages) == "benchmark"
    with pytest.raises(ValueError):
        await ledger.checkpoint(tid, "benchmark", "finished")

    await ledger.set_trial(tid, status="running")
    await ledger.set_trial(tid, valid=False, reasons=["coverage 97% < 99%"])
    t = await ledger.trial(tid)
    assert (t.status, t.valid, t.reasons) == ("running", False, ("coverage 97% < 99%",))
    await ledger.set_trial(tid, valid=None)
    assert (await ledger.trial(tid)).valid is None

    await ledger.finish_campaign(cid, "completed")
    latest = await ledger.latest_campaign()
    assert latest.id == cid and latest.exit_status == "completed" and latest.finished_at is not None


async def test_results_and_stage_done_are_one_transaction(ledger):
    cid = await ledger.create_campaign("p", {}, "d", False, {})
    trials = await ledger.ensure_trials(cid, [{"config_id": "baseline", "rep": r} for r in (1, 2)])
    tid = trials[0].id
    await ledger.put_benchmark(tid, {"accuracy": {"mmlu": 0.7}, "tokens": 1234})
    await ledger.put_benchmark(tid, {"accuracy": {"mmlu": 0.71}, "tokens": 1234})  # replaces
    await ledger.put_epi(tid, {"epi": 1.5, "joules": np.float64(10.0), "missing": math.nan})
    res = await ledger.results(cid)
    assert res[0].benchmark["accuracy"]["mmlu"] == 0.71
    assert res[0].epi == {"epi": 1.5, "joules": 10.0, "missing": None}
    assert res[1].benchmark is None and res[1].epi is None
    assert await ledger.first_unfinished_stage(tid, ["benchmark", "calculate"]) is None
    # A failure between writing a result and marking its stage leaves neither.
    tid2 = trials[1].id
    with pytest.raises(RuntimeError):
        async with ledger.transaction():
            await ledger.put_benchmark(tid2, {"tokens": 1})
            raise RuntimeError("crash before the stage is marked")
    assert (await ledger.results(cid))[1].benchmark is None
    assert await ledger.first_unfinished_stage(tid2, ["benchmark"]) == "benchmark"


async def test_markers_and_window(ledger):
    cid = await ledger.create_campaign("p", {}, "d", False, {})
    [trial] = await ledger.ensure_trials(cid, [{"config_id": "baseline", "rep": 1}])
    assert await ledger.window(trial.id) is None
    await ledger.mark(trial.id, "begin", 10.0)
    assert await ledger.window(trial.id) is None
    await ledger.mark(trial.id, "end", 20.0)
    await ledger.mark(trial.id, "begin", 30.0)  # a rewound measurement restarts
    await ledger.mark(trial.id, "end", 45.0)
    assert await ledger.window(trial.id) == (30.0, 45.0)
    assert [m.kind for m in await ledger.markers(trial.id)] == ["begin", "end", "begin", "end"]
    with pytest.raises(ValueError):
        await ledger.mark(trial.id, "middle", 1.0)


async def test_events_commands_live_and_provenance_across_processes(ledger, tmp_path):
    viewer = await Ledger.open(tmp_path / "ledger.db", readonly=True)
    try:
        e1 = await ledger.event("stage", "surgery started", data={"config": "drop1_all"})
        e2 = await ledger.event("meter", "meter silent", level="warning")
        with pytest.raises(ValueError):
            await ledger.event("x", "y", level="loud")
        assert [e.id for e in await viewer.events_after(0)] == [e1, e2]
        assert [e.message for e in await viewer.events_after(e1)] == ["meter silent"]
        assert [e.id for e in await viewer.last_events(1)] == [e2]

        cmd = await viewer.put_command("pause", {"reason": "door open"})  # the viewer's only write
        [pending] = await ledger.pending_commands()
        assert pending.id == cmd and pending.args == {"reason": "door open"} and pending.ok is None
        waiter = asyncio.create_task(viewer.wait_command(cmd, timeout_s=5.0, poll_s=0.02))
        await ledger.complete_command(cmd, True, {"paused_at": "benchmark"})
        done = await waiter
        assert done.ok is True and done.result == {"paused_at": "benchmark"}
        assert await ledger.pending_commands() == []
        assert (
            await viewer.wait_command(await viewer.put_command("skip"), timeout_s=0.05, poll_s=0.01) is None
        )

        await ledger.set_live("meter", {"watts": [3.1, 10.2]})
        await ledger.set_live("meter", {"watts": [3.2, 10.1]})
        live = await viewer.get_live()
        assert live["meter"].value == {"watts": [3.2, 10.1]} and live["meter"].t > 0

        await ledger.put_provenance("campaign", 1, {"epiconsole": "0.1.0"})
        await ledger.put_provenance("campaign", 1, {"epiconsole": "0.1.1"})
        assert await viewer.provenance("campaign", "1") == {"epiconsole": "0.1.1"}
        assert await viewer.provenance("trial", 9) is None
    finally:
        await viewer.close()


async def test_small_commits_never_block_the_loop_while_the_file_is_locked(ledger, tmp_path):
    """The loop-thread sample commit never waits for a lock: busy, the worker thread waits instead."""
    await ledger.insert_samples(block(4))
    other = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # someone else holds the write lock
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.02)
            ticks += 1

    ticking = asyncio.create_task(ticker())
    # Released from the loop itself: a commit blocking the loop would never let this run.
    asyncio.get_running_loop().call_later(0.3, other.execute, "COMMIT")
    try:
        await asyncio.wait_for(ledger.insert_samples(block(4, start=4)), timeout=BUSY_TIMEOUT_S)
    finally:
        ticking.cancel()
        other.close()
    assert ticks >= 3, "the event loop stalled while the file was locked"
    assert same(await ledger.read_samples(T0 - 1, T0 + 100), block(8))
    await ledger.insert_samples(block(4, start=8))  # and the fast path is back
    assert await ledger.sample_count() == 12


async def test_concurrent_writers_in_one_process_do_not_interleave(ledger):
    """A transaction in one task is never joined by another task's writes."""
    started = asyncio.Event()

    async def slow_tx():
        async with ledger.transaction():
            await ledger.event("tx", "first")
            started.set()
            await asyncio.sleep(0.05)
            raise RuntimeError("rolled back")

    task = asyncio.create_task(slow_tx())
    await started.wait()
    await ledger.event("other", "not part of the transaction")
    await ledger.insert_samples(block(2))
    with pytest.raises(RuntimeError):
        await task
    assert [e.kind for e in await ledger.events_after(0)] == ["other"]
    assert await ledger.sample_count() == 2


def test_json_refuses_unknown_objects():
    from epiconsole.ledger.core import _dumps

    with pytest.raises(TypeError):
        _dumps({"x": object()})
    assert _dumps({"a": (1, np.int64(2), np.array([0.5, np.nan]))}) == '{"a":[1,2,[0.5,null]]}'
