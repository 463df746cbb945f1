"""End-to-end ingest benchmark: a 50 Hz meter during a real (simulated-lab) run.

The simulated lab runs in its own process at real time (time scale 1) with its meter at the board's top
rate, 50 samples/s x 4 channels; the lab service (engine, ingest, monitor, lm-eval) runs here and
measures one repetition of the baseline (shortened stabilization, 2 items per task). Reported:

* samples lost: lines the driver never received (seq gaps), events it dropped, ticks the ingest
  dropped, and received vs committed vs stored in the ledger (target: 0 lost),
* ingest lag: the longest time a tick waited in the buffer before its commit (target <= 0.25 s + one
  scheduling slice),
* CPU share of this process (engine + ingest + monitor + lm-eval) over the run, in % of one core.

Prints the figures and one JSON line; exits 1 if a sample was lost. Takes about a minute.
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


def bench_config(workdir: Path) -> cfgmod.LabConfig:
    base = cfgmod.sim_defaults()
    base = dataclasses.replace(
        base,
        lab=dataclasses.replace(base.lab, ledger=str(workdir / "ledger.sqlite")),
        meter=dataclasses.replace(base.meter, rate_hz=RATE_HZ),
        sim=dataclasses.replace(base.sim, time_scale=1.0),
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
    lost = st.lost + st.dropped_events + ing.dropped + (ing.received - ing.committed) + (ing.committed - stored)
    r = results[0]
    figures = {
        "bench": "e2e",
        "meter_rate_hz": RATE_HZ,
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
        "max_ingest_lag_s": round(ing.max_lag_s, 3),
        "cpu_share_pct_of_one_core": round(100.0 * cpu / wall, 1),
    }
    print(f"50 Hz x 4 channels during one repetition ({wall:.1f} s, {status}, "
          f"{'valid' if r.trial.valid else 'invalid: ' + '; '.join(r.trial.reasons)})")
    print(f"  samples: {ing.received} received, {ing.committed} committed, {stored} stored "
          f"(~{figures['observed_rate_hz']} /s); lost {lost} (wire {st.lost}, bad lines {st.bad_total})")
    print(f"  ingest: {ing.flushes} commits, longest wait before commit {ing.max_lag_s * 1000:.0f} ms")
    print(f"  CPU of the service process (engine, ingest, monitor, lm-eval): "
          f"{figures['cpu_share_pct_of_one_core']}% of one core")
    print(json.dumps(figures))
    return 0 if lost == 0 and status == "finished" else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
