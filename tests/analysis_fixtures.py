"""Ledgers built for analysis/export tests: real SQLite files, physically consistent synthetic data.

:func:`build_campaign` writes one campaign of the built-in pruning plan the way the engine does
(campaign, trials, window markers, meter samples, benchmark and EPI results in the seed schema,
verdicts, provenance) with figures from the simulated lab's documented physics model: per-node wall
watts from :class:`~epiconsole.sim.physics.Physics`, the cumulative ``Wh`` counter integrated from
them, durations from its token throughput, accuracies from its accuracy model. Energy is taken from
``Wh`` differences over the window (what the engine prefers), so an export's trapezoidal integration
of the watts trace is an independent check of it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from epiconsole.config import sim_defaults
from epiconsole.ledger import Ledger, SampleBlock
from epiconsole.matrix import Configuration, builtin
from epiconsole.sim.physics import Deployed, Physics

T_START = 1_780_000_000.0
TASKS = ("mmlu", "arc_challenge", "hellaswag")
PROMPT_TOKENS = 600
COMPLETION_TOKENS = 40


@dataclass
class Built:
    """What :func:`build_campaign` wrote, for the tests' expectations."""

    path: Path
    campaign_id: int
    trials: int
    #: (config_id, rep) -> the EPI result dict written.
    epi: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    #: (config_id, rep) -> the reasons of invalid repetitions.
    invalid: dict[tuple[str, int], list[str]] = field(default_factory=dict)
    failed: set[tuple[str, int]] = field(default_factory=set)


def _interp_wh(t: np.ndarray, wh: np.ndarray, at: float) -> float:
    return float(np.interp(at, t, wh))


async def build_campaign(
    path: Path,
    *,
    only: list[str] | None = None,
    reps: int = 3,
    simulated: bool = True,
    rate_hz: float = 10.0,
    seed: int = 7,
    invalid: dict[tuple[str, int], list[str]] | None = None,
    failed: set[tuple[str, int]] | None = None,
    pending: set[tuple[str, int]] | None = None,
    finish: str | None = "finished",
) -> Built:
    """Write one campaign of the pruning plan (restricted to ``only``) into the ledger at ``path``."""
    cfg = sim_defaults()
    plan = builtin("pruning").with_repetitions(reps)
    if only:
        plan = plan.only(only)
    physics = Physics(seed)
    invalid = invalid or {}
    failed = failed or set()
    pending = pending or set()
    built = Built(path=path, campaign_id=0, trials=0, invalid=dict(invalid), failed=set(failed))
    ledger = await Ledger.open(path)
    try:
        cid = await ledger.create_campaign(plan.name, plan.to_dict(), cfg.digest(), simulated,
                                           {"software": {"epiconsole": "test"}, "lab": "fixture"})
        built.campaign_id = cid
        rows = [{"config_id": c.id, "rep": r, "ord": c.order, "experts": c.experts, "target": c.target,
                 "data": asdict(c)} for c, r in plan.trials()]
        trials = await ledger.ensure_trials(cid, rows)
        built.trials = len(trials)
        t = T_START
        for trial in trials:
            key = (trial.config_id, trial.rep)
            if key in pending:
                continue
            conf = plan.get(trial.config_id)
            if key in failed:
                await ledger.set_trial(trial.id, status="failed", valid=False, reasons=["deploy failed: API did not answer"])
                continue
            t, epi = await _one_trial(ledger, physics, trial.id, conf, trial.rep, t, rate_hz, cfg.thresholds.token_denominator)
            reasons = invalid.get(key, [])
            epi["validity"] = {"valid": not reasons, "reasons": reasons}
            await ledger.put_epi(trial.id, epi)
            await ledger.put_provenance("trial", trial.id, {"simulated": simulated, "token_denominator": "all"})
            await ledger.set_trial(trial.id, status="done", valid=not reasons, reasons=reasons)
            built.epi[key] = epi
        if finish:
            await ledger.finish_campaign(cid, finish)
    finally:
        await ledger.close()
    return built


async def _one_trial(ledger: Ledger, physics: Physics, trial_id: int, conf: Configuration, rep: int,
                     t: float, rate_hz: float, denominator: str) -> tuple[float, dict[str, Any]]:
    d = Deployed(conf.id, experts=conf.experts, target=conf.target, strategy=conf.strategy)
    # Prompt/completion counts vary a little per repetition (different few-shot draws).
    rng = np.random.default_rng((physics.seed, trial_id))
    prompt = PROMPT_TOKENS + int(rng.integers(0, 20))
    completion = COMPLETION_TOKENS + int(rng.integers(0, 5))
    duration = physics.inference_seconds(d, prompt, completion)
    t0 = t + 5.0  # stabilised, window opens
    t1 = t0 + duration
    dt = 1.0 / rate_hz
    # Samples from 1 s before the window to 1 s after it (the ingest runs all the time).
    times = np.arange(t0 - 1.0, t1 + 1.0, dt) + float(rng.uniform(0, dt))
    n = times.shape[0]
    tick0 = int((t0 - T_START) * rate_hz)
    p = physics.p
    busy = (times >= t0) & (times <= t1)
    # Wall watts from the model (noise-free level per node and state) plus the model's meter noise.
    level = np.array([[physics.true_watts(k, b, True, d) for k in range(4)] for b in (False, True)])
    W = np.maximum(level[busy.astype(int)] + rng.normal(0.0, p.noise_w, (n, 4)), 0.0)
    V = p.mains_v + rng.normal(0.0, 0.3, (n, 4))
    PF = np.where(busy[:, None], p.pf_load, p.pf_idle) * np.ones((n, 4))
    A = W / PF / V
    VAR = np.sqrt(np.maximum((W / PF) ** 2 - W**2, 0.0))
    HZ = p.mains_hz + rng.normal(0.0, 0.01, (n, 4))
    # The board's energy counter accumulates the same power (trapezoid over device time).
    wh = np.zeros((n, 4))
    wh[1:] = np.cumsum((W[1:] + W[:-1]) / 2 * dt / 3600.0, axis=0)
    wh += 10.0 + np.arange(4)
    ms = ((times - T_START) * 1000).astype(np.int64)
    block = SampleBlock.from_arrays(times, seq=np.arange(n) + tick0, ms=ms, W=W, V=V, A=A, PF=PF, VAR=VAR, Hz=HZ, Wh=wh)
    await ledger.insert_samples(block)
    await ledger.mark(trial_id, "begin", t0)
    await ledger.mark(trial_id, "end", t1)
    per_node = {f"pi{k}": (_interp_wh(times, wh[:, k], t1) - _interp_wh(times, wh[:, k], t0)) * 3600.0 for k in range(4)}
    joules = sum(per_node.values())
    tokens = {"all": prompt + completion, "prompt": prompt, "completion": completion}[denominator]
    acc = {}
    for task in TASKS:
        prob = physics.accuracy(task, d)
        acc[task] = round(float(np.clip(prob + rng.normal(0, 0.003), 0, 1)), 4)
    composite = sum(acc.values()) / len(acc)
    inside = busy
    bench = {
        "tasks": {k: {"acc": v, "n": 100} for k, v in acc.items()},
        "accuracy": {**acc, "composite": composite},
        "composite": composite,
        "tokens": {"prompt": prompt, "completion": completion, "total": prompt + completion},
        "requests": 300,
        "window": {"t0": t0, "t1": t1},
        "lm_eval_version": "0.4.13",
    }
    await ledger.put_benchmark(trial_id, bench)
    jpt = joules / tokens
    epi = {
        "energy": {
            "total_joules": joules,
            "total_tokens": tokens,
            "joules_per_token": jpt,
            "avg_watts_cluster": joules / duration,
            "peak_watts_cluster": float(W[inside].sum(axis=1).max()),
            "duration_seconds": duration,
            "kwh_total": joules / 3.6e6,
            "method": "wh_counter",
            "per_node": {k: {"channel": int(k[2:]), "joules": v, "coverage": 1.0} for k, v in per_node.items()},
        },
        "accuracy": {**acc, "composite": composite},
        "epi": {"value": jpt / composite, "joules_per_token": jpt, "accuracy_composite": composite},
        "environment": {"ambient_c": 22.0, "node_temp_max_c": {f"pi{k}": 55.0 + k for k in range(4)}},
        "tokens": {"prompt": prompt, "completion": completion, "denominator": denominator},
    }
    assert math.isfinite(epi["epi"]["value"])
    return t1 + 2.0, epi
