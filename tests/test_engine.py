"""The engine's state machine on a real SQLite ledger with a fast fake lab (see engine_fixtures)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from engine_fixtures import FakeActions, fast_config, small_plan

from epiconsole.engine import ABORTED, FINISHED, Engine, EngineEvent
from epiconsole.ledger import Ledger
from epiconsole.matrix import CONFIG_STAGES, REP_STAGES


@pytest.fixture
async def ledger(tmp_path):
    led = await Ledger.open(tmp_path / "ledger.sqlite")
    yield led
    await led.close()


def make_engine(ledger, tmp_path, actions, **thresholds):
    cfg = fast_config(tmp_path, **thresholds)
    engine = Engine(ledger, cfg, actions, trip_grace_s=0.2)
    events: list[EngineEvent] = []
    engine.listeners.append(events.append)
    return engine, events


async def wait_for(cond, timeout=5.0):
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.005)


async def test_runs_every_trial_through_every_stage_once(ledger, tmp_path):
    actions = FakeActions()
    engine, events = make_engine(ledger, tmp_path, actions)
    cid = await engine.open(small_plan(configs=3, reps=2))
    assert await engine.run() == FINISHED
    results = await ledger.results(cid)
    assert [(r.trial.config_id, r.trial.rep) for r in results] == [
        ("baseline", 1), ("baseline", 2), ("drop1_all", 1), ("drop1_all", 2), ("drop1_early", 1), ("drop1_early", 2)]
    assert all(r.trial.status == "done" and r.trial.valid for r in results)
    assert all(r.benchmark and r.epi for r in results)
    # Configuration stages once per configuration; the baseline skips surgery and validate.
    config_calls = [c for c in actions.calls if c[0] in CONFIG_STAGES]
    assert sorted(config_calls) == sorted([("convert", "baseline"), ("deploy", "baseline")] + [
        (s, cid_) for cid_ in ("drop1_all", "drop1_early") for s in CONFIG_STAGES])
    for cid_ in ("drop1_all", "drop1_early"):
        assert [c[0] for c in config_calls if c[1] == cid_] == list(CONFIG_STAGES)
    # The next configuration is built on the DGX while the current one is measured; deploy waits.
    first_bench = actions.calls.index(("benchmark", "baseline"))
    assert ("surgery", "drop1_all") in actions.calls[:first_bench + 1]
    assert actions.calls.index(("deploy", "drop1_all")) > actions.calls.index(("benchmark", "baseline"))
    assert max(i for i, c in enumerate(actions.calls) if c[1] == "baseline") < actions.calls.index(
        ("deploy", "drop1_all"))
    for r in results:
        stages = [(c.stage, c.status) for c in await ledger.checkpoints(r.trial.id)]
        rep_stages = [s for s in stages if s[0] in REP_STAGES]
        assert rep_stages == [(s, st) for s in REP_STAGES for st in ("started", "done")]
        assert await ledger.provenance("trial", r.trial.id)
        assert await ledger.window(r.trial.id) is not None
    campaign = await ledger.campaign(cid)
    assert campaign.exit_status == FINISHED and campaign.provenance["config_digest"]
    names = {e.event for e in events}
    assert {"campaign", "stage", "verdict", "result"} <= names
    assert sum(1 for e in events if e.event == "result") == 6
    # The same events are in the ledger, so a runner following another process sees them too.
    stored = [EngineEvent.from_ledger(e.kind, e.message, e.data, e.t) for e in await ledger.events_after(0, 1000)]
    assert [e.event for e in stored if e] == [e.event for e in events]


async def test_resume_after_interruption_continues_at_first_unfinished_stage(ledger, tmp_path):
    actions = FakeActions()
    actions.hold["benchmark"] = asyncio.Event()
    engine, _ = make_engine(ledger, tmp_path, actions)
    cid = await engine.open(small_plan(configs=2, reps=2))
    task = asyncio.create_task(engine.run())
    await wait_for(lambda: "benchmark" in actions.entered)
    task.cancel()  # the service stopping mid-benchmark leaves the campaign unfinished
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert (await ledger.campaign(cid)).finished_at is None

    actions2 = FakeActions()  # a fresh lab: nothing deployed any more
    engine2, events2 = make_engine(ledger, tmp_path, actions2)
    assert await engine2.open(small_plan(configs=1, reps=1), resume=True) == cid  # the stored plan wins
    assert await engine2.run() == FINISHED
    results = await ledger.results(cid)
    assert len(results) == 4 and all(r.trial.valid for r in results)
    # The half-done measurement was redone from stabilize; the model was redeployed, not rebuilt.
    baseline = [c[0] for c in actions2.calls if c[1] == "baseline"]
    assert baseline[:3] == ["deploy", "stabilize", "benchmark"]
    # drop1_all's build was under way before the interruption: each of its stages finished exactly once
    # (a stage cut off mid-way ran again from its start).
    anchor = next(r.trial for r in results if r.trial.config_id == "drop1_all")
    done = [c.stage for c in await ledger.checkpoints(anchor.id) if c.status == "done" and c.stage in CONFIG_STAGES]
    assert done == list(CONFIG_STAGES)
    first = results[0].trial
    assert [c.stage for c in await ledger.checkpoints(first.id) if c.status == "done"].count("benchmark") == 1


async def test_pause_waits_for_the_stage_boundary_and_resume_continues(ledger, tmp_path):
    actions = FakeActions()
    actions.hold["stabilize"] = asyncio.Event()
    engine, events = make_engine(ledger, tmp_path, actions)
    await engine.open(small_plan(configs=1, reps=1))
    task = asyncio.create_task(engine.run())
    await wait_for(lambda: "stabilize" in actions.entered)
    engine.pause()
    assert engine.state == "pausing"
    actions.hold["stabilize"].set()
    await wait_for(lambda: engine.state == "paused")
    await asyncio.sleep(0.05)
    assert ("benchmark", "baseline") not in actions.calls  # the stage in progress finished, the next did not start
    engine.resume()
    assert await asyncio.wait_for(task, 5) == FINISHED
    assert [e.data["status"] for e in events if e.event == "campaign"][1:3] == ["paused", "running"]


async def test_abort_discards_the_measurement_and_records_aborted(ledger, tmp_path):
    actions = FakeActions()
    actions.hold["benchmark"] = asyncio.Event()
    engine, events = make_engine(ledger, tmp_path, actions)
    cid = await engine.open(small_plan(configs=2, reps=1))
    task = asyncio.create_task(engine.run())
    await wait_for(lambda: "benchmark" in actions.entered)
    engine.abort()
    assert await asyncio.wait_for(task, 5) == ABORTED
    campaign = await ledger.campaign(cid)
    assert campaign.exit_status == ABORTED
    trial = (await ledger.trials(cid))[0]
    assert (await ledger.stage_status(trial.id))["benchmark"].status == "discarded"
    assert (await ledger.results(cid))[0].benchmark is None


async def test_suspender_trip_discards_and_redoes_the_measurement(ledger, tmp_path):
    actions = FakeActions()
    actions.hold["benchmark"] = asyncio.Event()
    engine, events = make_engine(ledger, tmp_path, actions)
    cid = await engine.open(small_plan(configs=1, reps=1))
    task = asyncio.create_task(engine.run())
    await wait_for(lambda: "benchmark" in actions.entered)
    actions.bad["meter"] = "silent for 3.0 s"
    await wait_for(lambda: engine.state == "suspended")
    assert engine.run_live().suspender == "meter: silent for 3.0 s"
    await asyncio.sleep(0.05)
    actions.hold["benchmark"].set()  # the held stage may not count: it was interrupted
    actions.bad.clear()
    assert await asyncio.wait_for(task, 5) == FINISHED
    kinds = [e.event for e in events]
    assert kinds.index("suspended") < kinds.index("resumed")
    assert [c for c in actions.calls if c[0] in ("stabilize", "benchmark")] == [
        ("stabilize", "baseline"), ("benchmark", "baseline"), ("stabilize", "baseline"), ("benchmark", "baseline")]
    r = (await ledger.results(cid))[0]
    assert r.trial.valid
    statuses = [(c.stage, c.status) for c in await ledger.checkpoints(r.trial.id)]
    assert ("benchmark", "discarded") in statuses
    assert len(actions.window_begins) == 2


async def test_settle_time_is_hysteresis(ledger, tmp_path):
    actions = FakeActions()
    engine, _ = make_engine(ledger, tmp_path, actions)
    engine.suspenders.settle_s = 0.3
    actions.bad["ambient"] = "31 °C"

    async def flap():
        await asyncio.sleep(0.1)
        actions.bad.clear()
        await asyncio.sleep(0.1)
        actions.bad["ambient"] = "31 °C"  # back out of band before the settle time ran out
        await asyncio.sleep(0.1)
        actions.bad.clear()

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    flapper = asyncio.create_task(flap())
    await engine.suspenders.wait_clear()
    await flapper
    assert loop.time() - t0 >= 0.3 + 0.3 - 0.05


async def test_failed_configuration_stage_fails_its_trials_and_retry_runs_them(ledger, tmp_path):
    actions = FakeActions()
    actions.fail["convert"] = 1
    engine, events = make_engine(ledger, tmp_path, actions)
    cid = await engine.open(small_plan(configs=2, reps=2))
    assert await engine.run() == FINISHED
    trials = await ledger.trials(cid)
    assert [t.status for t in trials] == ["failed", "failed", "done", "done"]
    assert "convert failed: convert refused by the fake lab" in trials[0].reasons[0]
    assert (await engine.summary())["failed"] == 2
    assert await engine.retry("baseline") == 2
    assert await engine.run() == FINISHED
    trials = await ledger.trials(cid)
    assert all(t.status == "done" and t.valid for t in trials)
    assert len(await ledger.results(cid)) == 4


async def test_skip_interrupts_the_running_configuration(ledger, tmp_path):
    actions = FakeActions()
    actions.hold["benchmark"] = asyncio.Event()
    engine, _ = make_engine(ledger, tmp_path, actions)
    cid = await engine.open(small_plan(configs=2, reps=2))
    task = asyncio.create_task(engine.run())
    await wait_for(lambda: "benchmark" in actions.entered)
    engine.skip("baseline")
    actions.hold["benchmark"].set()
    assert await asyncio.wait_for(task, 5) == FINISHED
    trials = await ledger.trials(cid)
    assert [t.status for t in trials] == ["skipped", "skipped", "done", "done"]


@pytest.mark.parametrize("mode", ["invalid", "redo"])
async def test_throttled_window_is_invalid_or_redone(ledger, tmp_path, mode):
    actions = FakeActions()
    actions.throttled_windows = 1
    engine, _ = make_engine(ledger, tmp_path, actions, on_throttle=mode)
    cid = await engine.open(small_plan(configs=1, reps=1))
    assert await engine.run() == FINISHED
    trial = (await ledger.trials(cid))[0]
    benches = [c for c in actions.calls if c[0] == "benchmark"]
    if mode == "invalid":
        assert trial.valid is False and "throttled" in trial.reasons[0]
        assert len(benches) == 1
    else:
        assert trial.valid is True
        assert len(benches) == 2


async def test_failing_measurement_is_retried_then_failed(ledger, tmp_path):
    actions = FakeActions()
    actions.fail["benchmark"] = 5
    engine, _ = make_engine(ledger, tmp_path, actions)
    cid = await engine.open(small_plan(configs=1, reps=1))
    assert await engine.run() == FINISHED
    trial = (await ledger.trials(cid))[0]
    assert trial.status == "failed" and "benchmark failed" in trial.reasons[0]
    assert sum(1 for c in actions.calls if c[0] == "benchmark") == engine.measure_attempts


async def test_a_failed_background_build_fails_that_configuration_only(ledger, tmp_path):
    actions = FakeActions()
    actions.fail["surgery"] = 1  # drop1_all's surgery, built while the baseline is measured
    engine, events = make_engine(ledger, tmp_path, actions)
    cid = await engine.open(small_plan(configs=3, reps=1))
    assert await engine.run() == FINISHED
    trials = {t.config_id: t for t in await ledger.trials(cid)}
    assert trials["baseline"].valid and trials["drop1_early"].valid
    assert trials["drop1_all"].status == "failed" and "surgery failed" in trials["drop1_all"].reasons[0]
    background = [e for e in events if e.event == "stage" and e.data.get("background")]
    assert "drop1_all" in {e.data["config_id"] for e in background}


async def test_skipping_the_configuration_being_built_interrupts_its_build(ledger, tmp_path):
    actions = FakeActions()
    actions.hold["validate"] = asyncio.Event()  # drop1_all's build waits in validate
    actions.hold["benchmark"] = asyncio.Event()
    engine, _ = make_engine(ledger, tmp_path, actions)
    cid = await engine.open(small_plan(configs=2, reps=1))
    task = asyncio.create_task(engine.run())
    await wait_for(lambda: "validate" in actions.entered and "benchmark" in actions.entered)
    engine.skip("drop1_all")
    actions.hold["benchmark"].set()
    assert await asyncio.wait_for(task, 5) == FINISHED
    trials = {t.config_id: t for t in await ledger.trials(cid)}
    assert trials["baseline"].valid and trials["drop1_all"].status == "skipped"
    anchor = trials["drop1_all"].id
    assert (await ledger.stage_status(anchor))["validate"].status == "discarded"


async def test_the_configuration_after_a_skipped_one_is_still_built_ahead(ledger, tmp_path):
    actions = FakeActions()
    actions.hold["benchmark"] = asyncio.Event()
    engine, events = make_engine(ledger, tmp_path, actions)
    cid = await engine.open(small_plan(configs=4, reps=1))
    task = asyncio.create_task(engine.run())
    await wait_for(lambda: ("convert", "drop1_all") in actions.calls)  # built while baseline measures
    engine.skip("drop1_all")
    actions.hold["benchmark"].set()
    assert await asyncio.wait_for(task, 5) == FINISHED
    statuses = [t.status for t in await ledger.trials(cid)]
    assert statuses == ["done", "skipped", "done", "done"]
    background = {e.data["config_id"] for e in events if e.event == "stage" and e.data.get("background")}
    assert "drop1_late" in background  # built while drop1_early was measured
