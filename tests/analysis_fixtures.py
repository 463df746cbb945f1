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
from epiconsole.ledger import Ledger, SampleBlock, Trial, TrialResult
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
            await ledger.put_provenance("trial", trial.id, {"simulated": simulated, "token_denominator": "all",
                                                             "lab": {"meter": {"uncertainty_pct": 1.0}}})
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
    stderr = {k: math.sqrt(v * (1 - v) / 100) for k, v in acc.items()}  # binomial, 100 items a task
    inside = busy
    bench = {
        "tasks": {k: {"acc": v, "stderr": stderr[k], "n": 100} for k, v in acc.items()},
        "task_details": {k: {"acc": v, "weight": 1.0} for k, v in acc.items()},
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
        "accuracy": {**acc, "composite": composite, "stderr": stderr},
        "epi": {"value": jpt / composite, "joules_per_token": jpt, "accuracy_composite": composite},
        "environment": {"ambient_c": 22.0, "node_temp_max_c": {f"pi{k}": 55.0 + k for k in range(4)}},
        "tokens": {"prompt": prompt, "completion": completion, "denominator": denominator},
    }
    assert math.isfinite(epi["epi"]["value"])
    return t1 + 2.0, epi


# ------------------------------------------------------------------------------------------ in memory


def result(config_id: str, rep: int, *, experts: int = 0, target: str | None = None, ord_: int = 0,
           joules: float | None = 1000.0, tokens: int = 1000, acc: float | None = 0.76, seconds: float = 100.0,
           status: str = "done", valid: bool | None = True, reasons: tuple[str, ...] = (),
           strategy: str | None = None, tid: int = 0) -> TrialResult:
    """A TrialResult as the ledger returns it, with an EPI result in the seed schema."""
    trial = Trial(id=tid or hash((config_id, rep)) % 100000, campaign_id=1, config_id=config_id, rep=rep, ord=ord_,
                  experts=experts, target=target, status=status, valid=valid, reasons=reasons, updated_at=0.0,
                  config={"strategy": strategy})
    if status != "done":
        return TrialResult(trial, None, None)
    jpt = None if joules is None else joules / tokens
    value = None if jpt is None or not acc else jpt / acc  # no EPI at accuracy 0, as epi.epi
    epi = {
        "energy": {"total_joules": joules, "total_tokens": tokens, "joules_per_token": jpt,
                   "duration_seconds": seconds, "avg_watts_cluster": None if joules is None else joules / seconds},
        "accuracy": {"mmlu": acc, "arc_challenge": acc, "composite": acc, "stderr": {"mmlu": 0.01, "arc_challenge": 0.02}},
        "epi": {"value": value, "joules_per_token": jpt, "accuracy_composite": acc},
        "validity": {"valid": bool(valid), "reasons": list(reasons)},
    }
    return TrialResult(trial, {"composite": acc, "window": {"t0": 10.0, "t1": 10.0 + seconds}}, epi)


def matrix_results(loss_pts: Any, jpt_of: Any, tolerance_reps: int = 3) -> list[TrialResult]:
    """Results for the whole pruning plan with accuracy loss and J/token given as functions of (n, target)."""
    out = []
    for c in builtin("pruning").configurations:
        for rep in range(1, tolerance_reps + 1):
            acc = 0.76 - loss_pts(c.experts, c.target) / 100.0
            jpt = jpt_of(c.experts, c.target) * (1 + 0.001 * (rep - 2))
            out.append(result(c.id, rep, experts=c.experts, target=c.target, ord_=c.order, joules=jpt * 1000,
                              tokens=1000, acc=acc, strategy=c.strategy))
    return out


def paper_like_results() -> list[TrialResult]:
    """The whole pruning plan, 3 repetitions, shaped like the paper's findings."""
    # Accuracy loss of the simulated physics model (remove: 0.15 n^1.5 points; zero: 0.6 n early, 0.3 n late)
    # and a J/token that falls with depth: EPI is lowest at 5 for 'all' while accuracy allows only 3.
    def loss(n: int, target: str | None) -> float:
        if n == 0:
            return 0.0
        return 0.15 * n**1.5 if target == "all" else {"early": 0.6, "late": 0.3}[target] * n

    def jpt(n: int, target: str | None) -> float:
        return 1.2 * (1 - 0.012 * n) if target == "all" else 1.2 * (1 - 0.001 * n)

    return matrix_results(loss, jpt)
