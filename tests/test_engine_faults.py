"""Faults on the real simulated lab (real pty meter, real SSH servers, real HTTP API, real lm-eval, real
SQLite), flipped from the test at the moment the engine enters a stage.

The simulated lab runs in this process here so the test can flip its fault switches directly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import tempfile

import pytest

from epiconsole import config as cfgmod
from epiconsole.engine import EngineEvent
from epiconsole.headless import sim_config
from epiconsole.service import LabService
from epiconsole.sim.lab import SimulatedLab

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def workdir():
    # Not under /tmp: the simulated machines give every host a private /tmp (see epiconsole.sim.shell).
    d = tempfile.mkdtemp(prefix="epiconsole-faults-", dir="/var/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def lab_config(workdir: str, **thresholds) -> cfgmod.LabConfig:
    base = cfgmod.sim_defaults()
    base = dataclasses.replace(
        base,
        lab=dataclasses.replace(base.lab, ledger=f"{workdir}/ledger.sqlite"),
        thresholds=dataclasses.replace(base.thresholds, **thresholds),
    )
    return sim_config(base)


async def run_campaign(workdir, on_event, **thresholds):
    """Run baseline x1 on a fresh simulated lab; ``on_event(ev, lab)`` sees every engine event."""
    cfg = lab_config(workdir, **thresholds)
    async with SimulatedLab(cfg, f"{workdir}/lab") as lab:
        service = LabService(lab.config)
        events: list[EngineEvent] = []

        def listener(ev: EngineEvent) -> None:
            events.append(ev)
            on_event(ev, lab)

        service.listeners.append(listener)
        await service.start()
        try:
            await service.start_campaign(only=["baseline"], reps=1)
            status = await asyncio.wait_for(service.wait_campaign(), 180)
            results = await service.ledger.results(service.engine.campaign_id)
            checkpoints = await service.ledger.checkpoints(results[0].trial.id)
            gaps = await service.ledger.gaps()
        finally:
            await service.stop()
    return status, events, results, checkpoints, gaps


def is_stage(ev: EngineEvent, stage: str, status: str) -> bool:
    return ev.event == "stage" and ev.data.get("stage") == stage and ev.data.get("status") == status


async def test_meter_unplugged_during_benchmark_trips_and_the_repetition_is_redone(workdir):
    loop = asyncio.get_running_loop()
    flipped = []

    def on_event(ev, lab):
        faults = lab.state.faults
        if is_stage(ev, "benchmark", "started") and not flipped:
            flipped.append(ev.t)
            loop.call_later(0.3, setattr, faults, "meter_unplugged", True)
        elif ev.event == "suspended":
            loop.call_later(0.5, setattr, faults, "meter_unplugged", False)

    status, events, results, checkpoints, gaps = await run_campaign(workdir, on_event)
    assert status == "finished"
    kinds = [e.event for e in events]
    assert "suspended" in kinds and kinds.index("suspended") < kinds.index("resumed")
    suspended = next(e for e in events if e.event == "suspended")
    assert "meter" in suspended.data["reason"]
    assert ("benchmark", "discarded") in [(c.stage, c.status) for c in checkpoints]
    [r] = results
    assert r.trial.status == "done" and r.trial.valid, r.trial.reasons
    assert r.epi["validity"]["valid"] and r.epi["energy"]["total_joules"] > 0
    assert any(g.cause == "unplug" for g in gaps)  # the unplug is on record, outside the valid window


async def test_node_throttled_during_the_window_makes_the_repetition_invalid(workdir):
    def on_event(ev, lab):
        faults = lab.state.faults
        if is_stage(ev, "benchmark", "started"):
            faults.node_throttled = {"pi1"}
        elif is_stage(ev, "benchmark", "done"):
            faults.node_throttled = set()

    status, events, results, checkpoints, gaps = await run_campaign(workdir, on_event)
    assert status == "finished"
    [r] = results
    assert r.trial.valid is False
    assert any(reason.startswith("pi1 throttled during the window") for reason in r.trial.reasons), r.trial.reasons
    verdict = next(e for e in events if e.event == "verdict")
    assert verdict.data["valid"] is False and verdict.data["reasons"] == list(r.trial.reasons)


async def test_node_throttled_with_on_throttle_redo_is_redone(workdir):
    loop = asyncio.get_running_loop()
    flipped = []

    def on_event(ev, lab):
        faults = lab.state.faults
        if is_stage(ev, "benchmark", "started") and not flipped:
            flipped.append(1)
            faults.node_throttled = {"pi2"}
        elif ev.event == "suspended":
            loop.call_later(0.3, setattr, faults, "node_throttled", set())

    status, events, results, checkpoints, gaps = await run_campaign(workdir, on_event, on_throttle="redo")
    assert status == "finished"
    suspended = [e for e in events if e.event == "suspended"]
    assert suspended and "pi2 throttled" in suspended[0].data["reason"]
    [r] = results
    assert r.trial.valid, r.trial.reasons
