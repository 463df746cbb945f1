"""End-to-end ingest benchmark: a 50 Hz meter during a real (simulated-lab) run.

The simulated lab runs in its own process at twice real time (its model loads take 30 simulated
seconds, too long for its 30 s readiness limit at x1) with its meter at the board's top rate, 50 samples
per device second x 4 channels, so the host ingests 100 lines/s: twice the real board's top rate. The
lab service (engine, ingest, monitor, lm-eval) runs here and
measures one repetition of the baseline (shortened stabilization, 2 items per task). Reported:

* samples lost: lines the driver never received (seq gaps), events it dropped, ticks the ingest
  dropped, and received vs committed vs stored in the ledger (target: 0 lost),
* ingest lag: how long a tick waits from its arrival to its commit (target: p99 <= 250 ms),
* CPU share of this process (engine + ingest + monitor + lm-eval) over the run, in % of one core.

Prints the figures and one JSON line; exits 1 if a sample was lost or the 99th percentile of the
commit lag exceeds 250 ms. Takes about a minute.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from epiconsole import config as cfgmod
from epiconsole.headless import SimProcess, sim_config
from epiconsole.service import LabService

RATE_HZ = 50.0
TIME_SCALE = 2.0


def bench_config(workdir: Path) -> cfgmod.LabConfig:
    base = cfgmod.sim_defaults()
    base = dataclasses.replace(
        base,
        lab=dataclasses.replace(base.lab, ledger=str(workdir / "ledger.sqlite")),
        meter=dataclasses.replace(base.meter, rate_hz=RATE_HZ),
        sim=dataclasses.replace(base.sim, time_scale=TIME_SCALE),
        thresholds=dataclasses.replace(base.thresholds, stabilize_min_s=5.0, stabilize_window_s=2.0),
    )
    cfg = sim_config(base)
    return dataclasses.replace(cfg, benchmark=dataclasses.replace(cfg.benchmark, limit=2))


async def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="epiconsole-bench-e2e-", dir="/var/tmp"))
    try:
        async with SimProcess(bench_config(workdir), workdir / "simlab") as cfg:
            service = LabService(cfg)
            await service.start()
            try:
                await service.meter.wait_connected(30)
                await asyncio.sleep(3.0)  # the rate command and a few samples
                wall0, cpu0 = time.monotonic(), time.process_time()
                await service.start_campaign(only=["baseline"], reps=1)
                status = await asyncio.wait_for(service.wait_campaign(), 600)
                wall, cpu = time.monotonic() - wall0, time.process_time() - cpu0
                await service.telemetry.flush()
                st = service.meter.status()
                ing = service.telemetry.stats()
                stored = await service.ledger.sample_count()
                results = await service.ledger.results(service.engine.campaign_id)
                span = await service.ledger.sample_span()
            finally:
                await service.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    seconds = (span[1] - span[0]) if span else 0.0
    lost = (
        st.lost + st.dropped_events + ing.dropped + (ing.received - ing.committed) + (ing.committed - stored)
    )
    r = results[0]
    figures = {
        "bench": "e2e",
        "meter_rate_hz": RATE_HZ,
        "time_scale": TIME_SCALE,
        "host_lines_per_s": RATE_HZ * TIME_SCALE,
        "channels": 4,
        "run_status": status,
        "repetition_valid": bool(r.trial.valid),
        "run_seconds": round(wall, 2),
        "samples_received": ing.received,
        "samples_committed": ing.committed,
        "samples_stored": stored,
        "observed_rate_hz": round(stored / seconds, 2) if seconds else None,
        "lines_lost_on_wire": st.lost,
        "bad_lines": st.bad_total,
        "samples_lost": lost,
        "commits": ing.flushes,
        "ingest_lag_p50_s": round(ing.lag_p50_s, 3),
        "ingest_lag_p99_s": round(ing.lag_p99_s, 3),
        "max_ingest_lag_s": round(ing.max_lag_s, 3),
        "cpu_share_pct_of_one_core": round(100.0 * cpu / wall, 1),
    }
    print(
        f"50 Hz x 4 channels at x{TIME_SCALE:g} ({RATE_HZ * TIME_SCALE:g} lines/s) during one repetition ({wall:.1f} s, {status}, "
        f"{'valid' if r.trial.valid else 'invalid: ' + '; '.join(r.trial.reasons)})"
    )
    print(
        f"  samples: {ing.received} received, {ing.committed} committed, {stored} stored "
        f"(~{figures['observed_rate_hz']} /s); lost {lost} (wire {st.lost}, bad lines {st.bad_total})"
    )
    print(f"  ingest: {ing.flushes} commits; a tick's wait from arrival to commit: median "
          f"{ing.lag_p50_s * 1000:.0f} ms, p99 {ing.lag_p99_s * 1000:.0f} ms, max {ing.max_lag_s * 1000:.0f} ms")
    print(
        f"  CPU of the service process (engine, ingest, monitor, lm-eval): "
        f"{figures['cpu_share_pct_of_one_core']}% of one core"
    )
    print(json.dumps(figures))
    return 0 if lost == 0 and status == "finished" and ing.lag_p99_s <= 0.25 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
