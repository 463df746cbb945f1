"""Crash safety: a writer killed with SIGKILL mid-batch loses nothing it reported committed.

A subprocess writes sample batches (and events) in a loop and reports each committed batch on its
stdout pipe. The test kills it with SIGKILL at an arbitrary moment (or deliberately inside a large
transaction that has already spilled into the WAL), reopens the file and checks that every reported
batch is intact, nothing is half-written, ``PRAGMA integrity_check`` is ok, and writing resumes.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from epiconsole.ledger import Ledger, SampleBlock

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")

CHILD = r'''
import asyncio
import sys

import numpy as np

from epiconsole.ledger import Ledger, SampleBlock

T0 = 1_780_000_000.0
BATCH = 12


def batch(k: int) -> SampleBlock:
    """Batch k: ticks 12k .. 12k+11 at 50 Hz, values a function of the tick index."""
    i = np.arange(BATCH * k, BATCH * (k + 1))
    c = np.arange(4)
    grid = i[:, None] * 7 + c[None, :] * 13
    return SampleBlock.from_arrays(
        T0 + i * 0.02,
        seq=i,
        ms=i * 20,
        V=225.0 + (grid % 1000) / 100.0,
        W=np.float32(3.0 + (grid % 900) / 100.0).astype(np.float64),
        Wh=10.0 + i[:, None] * 1e-4 + c[None, :],
    )


async def main(path: str, start: int, mode: str) -> None:
    ledger = await Ledger.open(path)
    k = start
    while True:
        if mode == "tx" and k == start + 20:
            # A large transaction: far more than the page cache holds, so uncommitted pages reach
            # the WAL before the kill.
            async with ledger.transaction():
                big = SampleBlock.from_arrays(
                    T0 + 1e6 + np.arange(40_000) * 0.02, W=np.ones((40_000, 4)), Wh=np.ones((40_000, 4))
                )
                await ledger.insert_samples(big)
                await ledger.event("tx", "never committed")
                print("INTX", flush=True)
                await asyncio.sleep(60)
        await ledger.insert_samples(batch(k))
        if k % 4 == 0:
            await ledger.event("batch", str(k), data={"k": k})
        print(f"OK {k}", flush=True)
        k += 1


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
'''


@pytest.fixture
def child(tmp_path: Path):
    script = tmp_path / "writer.py"
    script.write_text(CHILD)
    spec = importlib.util.spec_from_file_location("crash_writer", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return script, module


async def run_and_kill(
    script: Path, db: Path, start: int, mode: str, kill_after: int, delay_s: float
) -> list[int]:
    """Start the writer, read its reports until ``kill_after`` batches (or INTX), SIGKILL it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), str(db), str(start), mode, stdout=asyncio.subprocess.PIPE
    )
    reported: list[int] = []
    killed = False
    try:
        while True:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
            assert line, "the writer died on its own"
            if line.startswith(b"OK "):
                reported.append(int(line.split()[1]))
            if line.strip() == b"INTX" or len(reported) >= kill_after:
                break
        await asyncio.sleep(delay_s)  # the writer keeps committing: the kill lands wherever it is
        # Reports written before the kill still count as committed.
        os.kill(proc.pid, signal.SIGKILL)
        killed = True
        rest = await asyncio.wait_for(proc.stdout.read(), timeout=10)
        reported += [int(x.split()[1]) for x in rest.splitlines() if x.startswith(b"OK ")]
    finally:
        # Only when the kill above was never sent: proc.kill() polls (waitpid) first, which can reap
        # the child before asyncio's watcher does, and asyncio then reports returncode 255.
        if not killed and proc.returncode is None:
            proc.kill()
        await asyncio.wait_for(proc.wait(), timeout=10)
    assert proc.returncode == -signal.SIGKILL
    return reported


def assert_batches(stored: SampleBlock, module, reported: list[int]) -> int:
    """Every reported batch intact, every stored batch complete; returns the next batch index."""
    ticks = stored.seq
    assert np.all(np.diff(ticks) == 1), "ticks are missing or duplicated"
    assert ticks[0] == 0 and ticks.size % module.BATCH == 0, "a batch was half written"
    batches = ticks.size // module.BATCH
    assert max(reported) < batches, "a reported batch is missing"
    assert batches <= max(reported) + 2, "more batches than were attempted"
    expected = SampleBlock.concat([module.batch(k) for k in range(batches)])
    assert np.array_equal(stored.t, expected.t)
    assert np.array_equal(stored.W, expected.W) and np.array_equal(stored.Wh, expected.Wh)
    assert np.allclose(stored.V, expected.V, atol=0.005)
    return batches


async def test_sigkill_mid_batch_keeps_every_committed_batch(tmp_path, child):
    script, module = child
    db = tmp_path / "ledger.db"
    start = 0
    reported: list[int] = []
    for kill_after, delay in ((40, 0.0), (25, 0.013), (60, 0.031)):
        reported += await run_and_kill(script, db, start, "loop", kill_after, delay)
        # A viewer can read the crashed file as it is, before any writer reopens it.
        async with await Ledger.open(db, readonly=True) as viewer:
            assert await viewer.integrity_check() == "ok"
            seen = await viewer.read_samples(module.T0 - 1, module.T0 + 1e5)
        start = assert_batches(seen, module, reported)
        async with await Ledger.open(db) as writer:
            assert await writer.integrity_check() == "ok"
            events = await writer.events_after(0, limit=10_000)
            assert {e.data["k"] for e in events} <= set(range(start)), "an event outlived its batch"
    assert len(reported) >= 125


async def test_sigkill_inside_a_large_transaction_leaves_no_trace(tmp_path, child):
    script, module = child
    db = tmp_path / "ledger.db"
    reported = await run_and_kill(script, db, 0, "tx", kill_after=10**9, delay_s=0.05)
    assert len(reported) == 20
    wal = db.with_name(db.name + "-wal")
    assert wal.stat().st_size > 2 * 1024 * 1024, "the transaction never reached the WAL"
    async with await Ledger.open(db) as ledger:
        assert await ledger.integrity_check() == "ok"
        stored = await ledger.read_samples(module.T0 - 1, module.T0 + 2e6)
        assert assert_batches(stored, module, reported) == 20
        assert [e.kind for e in await ledger.events_after(0)] == ["batch"] * 5
        # The writer resumes where the file stands.
        await ledger.insert_samples(module.batch(20))
        after = await ledger.read_samples(module.T0 - 1, module.T0 + 2e6)
        assert assert_batches(after, module, reported + [20]) == 21
