"""Helpers for the engine tests: a fast fake of :class:`StageActions` and small configs and plans.

The fake stands in for the lab only in the state-machine tests; the end-to-end tests use the real
simulated lab. It records every call, lets a test hold a stage open (to pause, abort, trip a suspender
or kill the process mid-stage), fail a stage, and flip suspender conditions.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

from epiconsole import config as cfgmod
from epiconsole.engine.actions import Progress, StageError, Window
from epiconsole.matrix import Configuration, Plan, pruning_plan


def fast_config(tmp_path: Path, **thresholds: Any) -> cfgmod.LabConfig:
    base = cfgmod.sim_defaults()
    th = dataclasses.replace(base.thresholds, suspender_settle_s=0.1, **thresholds)
    return dataclasses.replace(
        base,
        lab=dataclasses.replace(base.lab, ledger=str(tmp_path / "ledger.sqlite")),
        thresholds=th,
        sim=dataclasses.replace(base.sim, time_scale=1.0),
    )


def small_plan(configs: int = 3, reps: int = 2) -> Plan:
    plan = pruning_plan(repetitions=reps)
    return dataclasses.replace(plan, configurations=plan.configurations[:configs])


class FakeActions:
    """Deterministic stand-in for the lab: results are a pure function of (configuration, repetition)."""

    def __init__(self, stage_s: float = 0.0) -> None:
        self.stage_s = stage_s
        self.calls: list[tuple[str, str]] = []
        self.bad: dict[str, str] = {}
        self.fail: dict[str, int] = {}  # stage -> times to fail
        self.hold: dict[str, asyncio.Event] = {}  # stage -> released when set
        self.entered: dict[str, asyncio.Event] = {}
        self.deployed_id: str | None = None
        self.throttled_windows = 0  # calculate reports throttling this many times
        self.window_begins: list[float] = []
        self._rep: dict[str, int] = {}

    def conditions(self) -> dict[str, str]:
        return dict(self.bad)

    async def _step(self, stage: str, config: Configuration) -> None:
        self.calls.append((stage, config.id))
        self.entered.setdefault(stage, asyncio.Event()).set()
        if stage in self.hold:
            await self.hold[stage].wait()
        if self.stage_s:
            await asyncio.sleep(self.stage_s)
        if self.fail.get(stage, 0) > 0:
            self.fail[stage] -= 1
            raise StageError(f"{stage} refused by the fake lab")

    async def prepare(self) -> dict[str, Any]:
        return {"meter": {"fw": "fake"}}

    async def surgery(self, config: Configuration, progress: Progress) -> dict[str, Any]:
        await self._step("surgery", config)
        return {"out": f"/work/{config.id}"}

    async def validate(self, config: Configuration, progress: Progress) -> dict[str, Any]:
        await self._step("validate", config)
        return {"ok": True}

    async def convert(self, config: Configuration, progress: Progress) -> dict[str, Any]:
        await self._step("convert", config)
        return {"model": f"dllama_model_{config.id}_q40.m"}

    async def deploy(self, config: Configuration, progress: Progress) -> dict[str, Any]:
        await self._step("deploy", config)
        self.deployed_id = config.id
        return {"model": config.id, "sha256": "0" * 64, "size": 1}

    async def deployed(self, config: Configuration, deploy: dict[str, Any] | None) -> bool:
        return self.deployed_id == config.id

    async def stabilize(self, config: Configuration, progress: Progress) -> dict[str, Any]:
        await self._step("stabilize", config)
        return {"seconds": 0.0}

    def window_begin(self, t0: float) -> None:
        self.window_begins.append(t0)

    async def benchmark(self, config: Configuration, progress: Progress) -> dict[str, Any]:
        await self._step("benchmark", config)
        progress(1.0, "done")
        acc = 0.8 - 0.01 * config.experts
        return {"tasks": {"t": {"acc": acc, "stderr": 0.01, "n": 10}}, "composite": acc,
                "tokens": {"prompt": 1000, "completion": 100}, "requests": 10, "failed_requests": 0}

    async def window_end(self, t1: float) -> None:
        return None

    async def calculate(self, window: Window, bench: dict[str, Any]) -> dict[str, Any]:
        config = Configuration(window.config_id, 0, "m")
        await self._step("calculate", config)
        joules = 4400.0 + 10 * window.rep
        tokens = bench["tokens"]["prompt"] + bench["tokens"]["completion"]
        reasons = []
        if self.throttled_windows > 0:
            self.throttled_windows -= 1
            reasons.append("pi1 throttled during the window (throttled)")
        jpt = joules / tokens
        return {
            "energy": {"total_joules": joules, "total_tokens": tokens, "joules_per_token": jpt},
            "accuracy": {"composite": bench["composite"]},
            "epi": {"value": jpt / bench["composite"], "joules_per_token": jpt,
                    "accuracy_composite": bench["composite"]},
            "validity": {"valid": not reasons, "reasons": reasons},
        }

    async def trial_provenance(self, config: Configuration) -> dict[str, Any]:
        return {"kernel": "fake"}
