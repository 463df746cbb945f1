"""Fixed cost of one benchmark run through lm-eval (the engine makes 75 per matrix).

Runs the simulated suite (3 local tasks, limit 5) against the simulated dllama-api N times after
``warm_up``, with the simulated inference time made negligible (a very large time scale), so what is
left is lm-eval's and our own per-call overhead. Prints figures and one JSON line; exits 1 when the
median per-call cost exceeds the target.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

from epiconsole import config
from epiconsole.headless import sim_config
from epiconsole.sim.api import SimApi
from epiconsole.sim.physics import Deployed
from epiconsole.sim.state import SimLab

RUNS = 10
TARGET_S = 0.25


async def main() -> int:
    from epiconsole.benchmark.suite import run_suite, warm_up

    cfg = config.sim_defaults()
    cfg = dataclasses.replace(cfg, sim=dataclasses.replace(cfg.sim, time_scale=1e6))
    bench = sim_config(cfg).benchmark
    lab = SimLab(cfg)
    lab.deployed = Deployed("baseline")
    api = SimApi(lab)
    await api.start(0)
    try:
        t = time.monotonic()
        await asyncio.to_thread(warm_up, bench, simulated=True)
        warm = time.monotonic() - t
        times = []
        for _ in range(RUNS):
            t = time.monotonic()
            result = await run_suite(api.url, bench, simulated=True)
            times.append(time.monotonic() - t)
    finally:
        await api.stop()
    per_call = statistics.median(times[1:])
    requests = api.tally.requests // RUNS
    ok = per_call <= TARGET_S
    print(f"machine: {os.cpu_count()} cores, python {platform.python_version()}")
    print(f"warm_up (import lm-eval, build tasks)  {warm:6.2f} s")
    print(f"first run after warm-up                {times[0]:6.3f} s")
    print(f"each later run, median of {RUNS - 1}          {per_call:6.3f} s  ({requests} requests; target <= {TARGET_S} s)")
    print(json.dumps({"bench": "lmeval", "warm_up_s": warm, "first_s": times[0], "per_call_s": per_call,
                      "requests_per_call": requests, "composite": result.composite, "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
