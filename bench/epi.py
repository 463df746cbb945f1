"""EPI of a 6-hour, 50 Hz, 4-node trace read from the ledger.

Setup (not timed): 6 h x 50 Hz x 4 channels = 4.32 M channel samples written to a fresh ledger.
Timed: a viewer opens the ledger read-only, reads the window (plus a gap-limit margin), integrates
every node's energy (counters, as the engine does) and computes J/token and EPI. Then the engine's
own calculate stage (:func:`epiconsole.engine.calculate.compute`: board order, device time, energy
per node, validity) on the same read, which is what a repetition really costs. The trapezoid path
(counters ignored) is timed too, for information. Target: <= 2 s for both. Prints figures and a
JSON line; exits 1 when a target is missed.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import T0, Report, header, synthetic_block  # noqa: E402

from epiconsole import epi  # noqa: E402
from epiconsole.config import sim_defaults  # noqa: E402
from epiconsole.engine.calculate import compute  # noqa: E402
from epiconsole.engine.validity import WindowHealth  # noqa: E402
from epiconsole.ledger import Ledger  # noqa: E402

RATE_HZ = 50.0
HOURS = 6.0
NODES = {"0": "pi0", "1": "pi1", "2": "pi2", "3": "pi3"}
GAP_LIMIT_S = 1.0
TOKENS = 2_000_000
ACCURACY = 0.62


async def main() -> int:
    header("bench/epi.py: EPI of a 6 h, 50 Hz, 4-node trace from the ledger")
    report = Report("epi")
    n = int(HOURS * 3600 * RATE_HZ)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "ledger.db")
        start = time.perf_counter()
        trace = synthetic_block(n, RATE_HZ)
        async with await Ledger.open(path) as ledger:
            step = int(3600 * RATE_HZ)
            for a in range(0, n, step):
                await ledger.insert_samples(trace.take(slice(a, a + step)))
        setup_s = time.perf_counter() - start
        t0, t1 = T0 + 1.0, T0 + HOURS * 3600 - 1.0
        size_mb = path.stat().st_size / 1e6

        start = time.perf_counter()
        async with await Ledger.open(path, readonly=True) as viewer:
            block = await viewer.read_samples(t0 - GAP_LIMIT_S, t1 + GAP_LIMIT_S, fields=("W", "Wh"))
        read_s = time.perf_counter() - start
        energy = epi.cluster_energy(block, t0, t1, GAP_LIMIT_S, NODES)
        jpt = epi.joules_per_token(energy.joules, TOKENS)
        value = epi.epi(jpt, ACCURACY)
        total_s = time.perf_counter() - start

        # The engine's calculate stage on the same samples (its read is the one timed above).
        cfg = sim_defaults()
        start = time.perf_counter()
        result = compute(block, t0, t1, {"tokens": {"prompt": TOKENS, "completion": 0}, "composite": ACCURACY},
                         WindowHealth(), cfg=cfg, scale=1.0, meta={})
        engine_s = read_s + time.perf_counter() - start

        start = time.perf_counter()
        W = block.W
        trapezoid = {
            node: epi.window_energy(block.t, W[:, int(c)], None, t0, t1, GAP_LIMIT_S)
            for c, node in NODES.items()
        }
        trapezoid_s = time.perf_counter() - start

    # Cross-check: the counter and the trapezoid agree on the synthetic trace.
    trap_j = sum(e.joules for e in trapezoid.values())
    agree = abs(trap_j - energy.joules) / energy.joules
    report.figure("channel_samples", block.n * block.channels, "channel samples read")
    report.figure("setup_s", round(setup_s, 2), "setup: generate + write the trace", "s")
    report.figure("ledger_mb", round(size_mb, 1), "ledger file", "MB")
    report.figure("read_s", round(read_s, 3), "open read-only + read the window", "s")
    report.figure("epi_total_s", round(total_s, 3), "read + energy (counters) + J/token + EPI", "s")
    report.figure("engine_calculate_s", round(engine_s, 3), "read + the engine's calculate stage", "s")
    report.figure("trapezoid_s", round(trapezoid_s, 3), "energy by trapezoid, 4 nodes (extra)", "s")
    report.figure("joules", round(energy.joules, 1), "cluster energy", "J")
    report.figure("method", energy.method, "method")
    report.figure("coverage", round(energy.coverage, 6), "coverage (worst node)")
    report.figure("epi", round(value, 6), "EPI (2 M tokens, accuracy 0.62)", "J/token")
    report.figure("counter_vs_trapezoid", round(agree, 6), "relative difference counter vs trapezoid")
    engine_j = result["energy"]["total_joules"]
    report.target("EPI of 4.32 M channel samples from the ledger <= 2 s", total_s <= 2.0)
    report.target("the engine's calculate stage on them <= 2 s", engine_s <= 2.0)
    report.target("the engine's energy equals the counter energy within 1e-9",
                  engine_j is not None and abs(engine_j - energy.joules) <= 1e-9 * energy.joules)
    report.target("counter and trapezoid agree within 0.1%", agree < 1e-3)
    return report.finish()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
