"""A seeded, scripted simulated campaign written into a real ledger file, and a console factory for
tests and snapshots.

The ledger is written through the real :class:`epiconsole.ledger.Ledger` API; only its clock is frozen
(``time.time`` inside the ledger module is replaced while the script runs), so every timestamp, and
therefore every screen, is the same on every run. Electrical values come from the simulated lab's
documented physics (:mod:`epiconsole.sim.physics`) with a fixed seed; accuracy draws are seeded too.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

import epiconsole.ledger.core as ledger_core
from epiconsole.ledger import Ledger, SampleBlock
from epiconsole.live import AmbientLive, LiveSnapshot, MeterLive, NodeLive, NodesLive, RunLive, ServiceLive
from epiconsole.matrix import pruning_plan
from epiconsole.sim.physics import Deployed, Physics

#: The frozen "now" of every snapshot: 2026-03-02 10:00:00 UTC.
FROZEN_NOW = 1_772_445_600.0
SEED = 42
NODES = ("pi0", "pi1", "pi2", "pi3")
#: Configurations finished in the scripted campaign (run order 0..13), and the one running now.
DONE_CONFIGS = 14
RUNNING_CONFIG = 14
PROMPT_TOKENS = 9_000
GEN_TOKENS = 620
TASKS = ("mmlu", "arc_challenge", "hellaswag")
ITEMS_PER_TASK = 200
#: (config id, rep) -> reasons it is invalid.
INVALID = {("drop3_early", 2): ("node pi2 throttled during the window (freq capped)",)}
#: The trial whose power trace is stored (the detail view's snapshot opens it).
TRACE_TRIAL = ("baseline", 1)
RATE_HZ = 10.0


@contextlib.contextmanager
def frozen_ledger_clock(clock: list[float]) -> Iterator[None]:
    """Make the ledger stamp rows with ``clock[0]`` instead of the wall clock."""
    fake = types.SimpleNamespace(time=lambda: clock[0], monotonic=time.monotonic)
    real = ledger_core.time
    ledger_core.time = fake  # type: ignore[assignment]
    try:
        yield
    finally:
        ledger_core.time = real


def use_utc() -> None:
    """Clock strings on screen (HH:MM:SS) must not depend on the machine's time zone."""
    os.environ["TZ"] = "UTC"
    time.tzset()


def _deployed(cfg: Any) -> Deployed:
    return Deployed(cfg.id, experts=cfg.experts, target=cfg.target, strategy=cfg.strategy)


def _samples(phys: Physics, deployed: Deployed, t0: float, t1: float, busy_from: float, busy_to: float,
             wh0: np.ndarray, seq0: int) -> SampleBlock:
    n = int((t1 - t0) * RATE_HZ)
    t = t0 + np.arange(n) / RATE_HZ
    cols = {k: np.zeros((n, 4)) for k in ("V", "A", "W", "VAR", "PF", "Hz")}
    for i in range(n):
        busy = busy_from <= t[i] <= busy_to
        for ch in range(4):
            e = phys.electrical(ch, seq0 + i, busy, True, deployed)
            for k in cols:
                cols[k][i, ch] = getattr(e, k)
    wh = wh0 + np.cumsum(cols["W"], axis=0) / RATE_HZ / 3600.0
    return SampleBlock.from_arrays(t, seq=seq0 + np.arange(n), ms=(np.arange(n) * 100).astype(np.int64),
                                   Wh=wh, **cols)


def live_snapshot(phys: Physics, now: float = FROZEN_NOW) -> LiveSnapshot:
    """The live state a running simulated service would publish at ``now``."""
    plan = pruning_plan()
    cfg = plan.configurations[RUNNING_CONFIG]
    dep = _deployed(cfg)
    nodes: dict[str, NodeLive] = {}
    recent_n = 360  # 3 minutes at 2 Hz
    for i, name in enumerate(NODES):
        recent = []
        for k in range(recent_n):
            t = now - (recent_n - k) * 0.5
            busy = (k // 40) % 3 != 0  # requests with short idle gaps between them
            recent.append((t, round(phys.electrical(i, k, busy, True, dep).W, 3)))
        e = phys.electrical(i, 10_000, True, True, dep)
        nodes[name] = NodeLive(
            name=name, channel=i, W=round(e.W, 2), W_mean_10s=round(phys.true_watts(i, True, True, dep), 2),
            V=round(e.V, 1), A=round(e.A, 3), PF=round(e.PF, 2), Wh=12.3 + i,
            recent=tuple(recent), ssh_ok=True, temp_c=61.5 + 1.7 * i, arm_hz=2_400_000_000,
            governor="performance", load1=3.9 + 0.05 * i,
            throttled_now=("freq capped",) if name == "pi2" else (),
            throttled_since=("freq capped", "throttled") if name == "pi2" else (),
            health_time=now - 1.0, role="root" if i == 0 else "worker", process_running=True,
        )
    cluster = sum(n.W or 0.0 for n in nodes.values())
    return LiveSnapshot(
        service=ServiceLive(pid=4242, host="lab-orchestrator", started=now - 7200, heartbeat=now,
                            config_path="", lab_name="simulated lab", simulated=True, version="0.1.0"),
        meter=MeterLive(connected=True, port="/dev/pts/7", rate_hz=RATE_HZ, firmware="sim-1.0.0",
                        serial="SIM-0001", good_lines=71_234, bad_lines=0, lost_lines=3, reconnects=1,
                        fit_residual_ms=0.4, last_sample=now - 0.05),
        nodes=NodesLive(nodes=nodes, api_ok=True, api_model="Qwen3-30B-A3B " + cfg.id, cluster_W=round(cluster, 2)),
        run=RunLive(state="running", campaign_id=1, plan_name="pruning", config_id=cfg.id, repetition=1,
                    stage="benchmark", stage_started=now - 96, stage_eta=now + 162, stage_progress=0.42,
                    trials_done=DONE_CONFIGS * 3, trials_total=75, eta_s=4 * 3600 + 23 * 60,
                    window_start=now - 90, window_joules=3712.4, window_tokens=3_950, live_jpt=0.94),
        ambient=AmbientLive(temp_c=22.4, time=now - 2, in_band=True),
    )


async def write_lab_ledger(path: Path, seed: int = SEED) -> Path:
    """Script a campaign: 14 configurations done, the 15th benchmarking, the rest pending."""
    phys = Physics(seed)
    rng = np.random.default_rng(seed)
    plan = pruning_plan()
    clock = [FROZEN_NOW - 6 * 3600.0]
    with frozen_ledger_clock(clock):
        ledger = await Ledger.open(path)
        try:
            cid = await ledger.create_campaign(
                "pruning", plan.to_dict(), "f" * 64, True,
                {"epiconsole": "0.1.0", "python": "3.11", "lab": "simulated lab", "seed": seed},
            )
            rows = [{"config_id": c.id, "rep": r, "ord": c.order, "experts": c.experts, "target": c.target,
                     "data": {"strategy": c.strategy}} for c, r in plan.trials()]
            trials = {(t.config_id, t.rep): t for t in await ledger.ensure_trials(cid, rows)}
            await ledger.event("campaign", "campaign 1 started: pruning, 25 configurations x 3", trial_id=None)
            wh = np.array([10.0, 10.0, 10.0, 10.0])
            seq = 0
            for cfg in plan.configurations[: RUNNING_CONFIG + 1]:
                dep = _deployed(cfg)
                first = trials[(cfg.id, 1)]
                for stage in cfg.stages[:4] if cfg.modified else ("convert", "deploy"):
                    if stage not in cfg.stages:
                        continue
                    await ledger.checkpoint(first.id, stage, "started")
                    clock[0] += 40.0
                    await ledger.checkpoint(first.id, stage, "done", {"seconds": 40.0})
                await ledger.put_provenance("config", cfg.id, {"strategy": cfg.strategy or "none",
                                                                "experts": cfg.experts, "target": cfg.target or "-"})
                await ledger.event("deploy", f"{cfg.id} deployed to pi0", trial_id=first.id)
                for rep in range(1, plan.repetitions + 1):
                    trial = trials[(cfg.id, rep)]
                    running = cfg.order == RUNNING_CONFIG
                    if running and rep > 1:
                        break
                    await ledger.set_trial(trial.id, status="running")
                    await ledger.checkpoint(trial.id, "stabilize", "started")
                    clock[0] += 60.0
                    await ledger.checkpoint(trial.id, "stabilize", "done")
                    await ledger.checkpoint(trial.id, "benchmark", "started")
                    begin = clock[0]
                    await ledger.mark(trial.id, "begin", begin)
                    if running:
                        await ledger.event("benchmark", f"{cfg.id} rep 1: benchmark running", trial_id=trial.id)
                        continue
                    secs = phys.inference_seconds(dep, PROMPT_TOKENS, GEN_TOKENS) * (1 + rng.normal(0, 0.01))
                    end = begin + secs
                    if (cfg.id, rep) == TRACE_TRIAL:
                        block = _samples(phys, dep, begin - 8.0, end + 8.0, begin, end, wh, seq)
                        await ledger.insert_samples(block)
                        seq += block.n
                    clock[0] = end
                    await ledger.mark(trial.id, "end", end)
                    acc = {}
                    for task in TASKS:
                        p = phys.accuracy(task, dep)
                        acc[task] = float(rng.binomial(ITEMS_PER_TASK, p)) / ITEMS_PER_TASK
                    acc_c = sum(acc.values()) / len(acc)
                    watts = sum(phys.true_watts(i, True, True, dep) for i in range(4))
                    joules = watts * secs * (1 + rng.normal(0, 0.004))
                    tokens = PROMPT_TOKENS + GEN_TOKENS
                    jpt = joules / tokens
                    await ledger.put_benchmark(trial.id, {"accuracy": {**acc, "composite": acc_c},
                                                          "tokens": {"prompt": PROMPT_TOKENS, "generated": GEN_TOKENS}})
                    await ledger.put_epi(trial.id, {
                        "energy": {"total_joules": joules, "total_tokens": tokens, "joules_per_token": jpt,
                                   "avg_watts_cluster": watts, "duration_seconds": secs,
                                   "kwh_total": joules / 3.6e6},
                        "accuracy": {**acc, "composite": acc_c},
                        "epi": {"value": jpt / acc_c, "joules_per_token": jpt, "accuracy_composite": acc_c},
                        "simulated": True,
                    })
                    clock[0] += 5.0
                    reasons = INVALID.get((cfg.id, rep), ())
                    await ledger.checkpoint(trial.id, "log", "done")
                    await ledger.set_trial(trial.id, status="done", valid=not reasons, reasons=reasons)
                    await ledger.put_provenance("trial", trial.id, {"window_s": round(secs, 1), "coverage": 1.0,
                                                                     "token_accounting": "all"})
                    level = "warning" if reasons else "info"
                    msg = f"{cfg.id} rep {rep}: EPI {jpt / acc_c:.3f} ({jpt:.3f} J/tok, acc {acc_c:.1%})"
                    if reasons:
                        msg += " — INVALID: " + "; ".join(reasons)
                    await ledger.event("result", msg, level=level, trial_id=trial.id)
            await ledger.event("suspender", "meter silent for 2.1 s: paused at stage boundary", level="warning")
            await ledger.event("suspender", "meter back: resumed after 30 s settle", level="info")
            await ledger.event("node", "pi2 reports freq capped (throttled bit 1)", level="error")
            clock[0] = FROZEN_NOW
            for key, value in live_snapshot(phys).to_live().items():
                await ledger.set_live(key, value)
        finally:
            await ledger.close()
    return path


def build_lab_ledger(path: Path, seed: int = SEED) -> Path:
    """Synchronous wrapper (for session fixtures)."""
    return asyncio.run(write_lab_ledger(path, seed))


def console_options(ledger_path: Path, **overrides: Any):  # type: ignore[no-untyped-def]
    """The options a snapshot or Pilot test runs the console with: frozen clock, no polling, no blink."""
    from screens.controllers.source import LedgerSource
    from screens.options import ConsoleOptions

    kwargs: dict[str, Any] = dict(
        source_factory=lambda: LedgerSource(ledger_path), clock=lambda: FROZEN_NOW, poll_hz=0.0, animate=False,
    )
    kwargs.update(overrides)
    return ConsoleOptions(**kwargs)


def finite(x: float) -> bool:
    return math.isfinite(x)


async def write_fault_live(path: Path) -> Path:
    """Overwrite the live state with a bad moment: pi1 unreachable, the meter unplugged, the room too
    warm, the run suspended (what the console must make obvious from across the room)."""
    import dataclasses

    phys = Physics(SEED)
    live = live_snapshot(phys)
    nodes = dict(live.nodes.nodes)
    nodes["pi1"] = dataclasses.replace(nodes["pi1"], ssh_ok=False, ssh_error="connection refused", W=None,
                                       W_mean_10s=None, V=None, A=None, PF=None, temp_c=None, arm_hz=None,
                                       governor="", process_running=None, recent=())
    live = dataclasses.replace(
        live,
        nodes=dataclasses.replace(live.nodes, nodes=nodes, cluster_W=None, api_ok=False),
        meter=dataclasses.replace(live.meter, connected=False, reconnects=4),
        run=dataclasses.replace(live.run, state="suspended", suspender="node pi1 unreachable",
                                suspended_since=FROZEN_NOW - 40, stage_progress=None, stage_eta=0.0),
        ambient=AmbientLive(temp_c=25.3, time=FROZEN_NOW - 2, in_band=False),
    )
    clock = [FROZEN_NOW]
    with frozen_ledger_clock(clock):
        async with await Ledger.open(path) as ledger:
            for key, value in live.to_live().items():
                await ledger.set_live(key, value)
    return path
