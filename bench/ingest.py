"""Telemetry ingest: meter ticks -> committed in the ledger, against raw ``sqlite3.executemany``.

The service commits every 250 ms; at the meter's top rate (50 Hz, 4 channels) that is ~12 ticks per
commit. Both paths get the same per-tick values (as the meter driver delivers them) in batches of
that size, one commit per batch, on files with the same settings (WAL, synchronous=NORMAL):

- ledger: ``SampleBlock.from_ticks`` + ``await Ledger.insert_samples`` (the service's path);
- raw: ``sqlite3.executemany`` of one row per tick, all channels as columns, then ``commit``.

Short segments (50 commits) alternate between the two so machine load hits both alike; rates are
totals, the ratio is the median of the per-segment ratios. Then the
ledger's growth is measured over one simulated hour at 10 Hz (the default rate) and at 50 Hz:
file bytes (after a WAL checkpoint) per stored channel sample, indexes included.

Targets: >= 20,000 channel samples/s, >= 0.5x raw, <= 40 bytes per channel sample. Prints figures and
a JSON line; exits 1 when a target is missed.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Report, header, synthetic_block, tick_tuples  # noqa: E402

from epiconsole.ledger import Ledger, SampleBlock  # noqa: E402

CHANNELS = 4
BATCH = 12  # ticks per commit: 50 Hz x 250 ms
BATCHES = 2400
SEGMENT = 50  # batches per alternating segment


def raw_open(path: Path) -> tuple[sqlite3.Connection, str]:
    """A plain sqlite3 file with the ledger's settings and one row per tick, all channels as columns."""
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    cols = ", ".join(
        f"{q}{c} REAL" for c in range(CHANNELS) for q in ("V", "A", "W", "VAR", "PF", "Hz", "Wh")
    )
    db.execute(f"CREATE TABLE samples (t REAL, seq INTEGER, ms INTEGER, st INTEGER, {cols})")
    db.execute("CREATE INDEX samples_t ON samples(t)")
    db.commit()
    return db, f"INSERT INTO samples VALUES ({', '.join('?' * (4 + 7 * CHANNELS))})"


async def ledger_segment(ledger: Ledger, batches: list[list[tuple]]) -> float:
    """Seconds to parse, pack and commit each batch through the ledger (the service's path)."""
    start = time.perf_counter()
    for ticks in batches:
        await ledger.insert_samples(SampleBlock.from_ticks(ticks, CHANNELS))
    return time.perf_counter() - start


def raw_segment(db: sqlite3.Connection, sql: str, batches: list[list[tuple]]) -> float:
    """Seconds to executemany + commit each batch as one row per tick."""
    start = time.perf_counter()
    for ticks in batches:
        db.executemany(sql, [(t, s, m, b, *[v for ch in chans for v in ch]) for t, s, m, b, chans in ticks])
        db.commit()
    return time.perf_counter() - start


async def growth(path: Path, rate_hz: float, seconds: float) -> float:
    """Bytes per channel sample after storing ``seconds`` of samples in 250 ms commits."""
    per_commit = max(1, round(rate_hz * 0.25))
    n = int(rate_hz * seconds)
    block = synthetic_block(n, rate_hz, seed=7)
    ledger = await Ledger.open(path)
    try:
        db = ledger._db  # noqa: SLF001 - the bench reads page counts directly
        await db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

        async def used() -> int:
            async with db.execute("PRAGMA page_count") as c:
                pages = (await c.fetchone())[0]
            async with db.execute("PRAGMA freelist_count") as c:
                free = (await c.fetchone())[0]
            async with db.execute("PRAGMA page_size") as c:
                size = (await c.fetchone())[0]
            return (pages - free) * size

        before = await used()
        for a in range(0, n, per_commit):
            await ledger.insert_samples(block.take(slice(a, a + per_commit)))
        await db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        after = await used()
        file_size = os.path.getsize(path)
    finally:
        await ledger.close()
    assert file_size >= after
    return (after - before) / (n * CHANNELS)


async def main() -> int:
    header("bench/ingest.py: meter ticks -> ledger")
    report = Report("ingest")
    block = synthetic_block(BATCH * BATCHES, 50.0)
    ticks = tick_tuples(block)
    batches = [ticks[i : i + BATCH] for i in range(0, len(ticks), BATCH)]
    samples = len(ticks) * CHANNELS
    ours, raw = [], []
    with tempfile.TemporaryDirectory() as tmp:
        ledger = await Ledger.open(Path(tmp, "ledger.db"))
        db, sql = raw_open(Path(tmp, "raw.db"))
        try:
            # Short alternating segments, so both paths see the same load on a shared machine.
            for i in range(0, len(batches), SEGMENT):
                segment = batches[i : i + SEGMENT]
                if (i // SEGMENT) % 2:
                    raw.append(raw_segment(db, sql, segment))
                    ours.append(await ledger_segment(ledger, segment))
                else:
                    ours.append(await ledger_segment(ledger, segment))
                    raw.append(raw_segment(db, sql, segment))
        finally:
            await ledger.close()
            db.close()
        ratios = [r / o for o, r in zip(ours, raw, strict=True)]
        ours_rate = samples / sum(ours)
        raw_rate = samples / sum(raw)
        b10 = await growth(Path(tmp, "growth10.db"), 10.0, 3600.0)
        b50 = await growth(Path(tmp, "growth50.db"), 50.0, 1200.0)
    ratio = statistics.median(ratios)
    report.figure("batch_ticks", BATCH, "ticks per commit (50 Hz x 250 ms)")
    report.figure("ledger_channel_samples_per_s", round(ours_rate), "ledger ingest", "channel samples/s")
    report.figure(
        "raw_channel_samples_per_s",
        round(raw_rate),
        "raw sqlite3.executemany, row per tick",
        "channel samples/s",
    )
    report.figure("ratio_vs_raw", round(ratio, 3), "ledger / raw (median over alternating segments)")
    report.figure(
        "bytes_per_channel_sample_10hz", round(b10, 2), "ledger growth at 10 Hz (1 h)", "B/channel sample"
    )
    report.figure(
        "bytes_per_channel_sample_50hz", round(b50, 2), "ledger growth at 50 Hz (20 min)", "B/channel sample"
    )
    report.target(">= 20,000 channel samples/s", ours_rate >= 20_000)
    report.target(">= 0.5x raw executemany", ratio >= 0.5)
    report.target("<= 40 bytes per channel sample", max(b10, b50) <= 40.0)
    return report.finish()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
