"""Controllers without a terminal: view data from a real ledger file written by the seeded script,
commands through the real ledger to a service loop, and the pure pieces (resampling, Pareto, optimal
depths, themes)."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import numpy as np
import pytest
from tui_fixtures import FROZEN_NOW, INVALID, RUNNING_CONFIG, build_lab_ledger, use_utc, write_fault_live

from epiconsole.errors import ConfigError
from epiconsole.ledger import Campaign, Ledger, Trial, TrialResult
from screens.controllers.commands import Commander, CommandRequest
from screens.controllers.curves import CurvesController
from screens.controllers.dashboard import DashboardController, resample
from screens.controllers.log import LogController
from screens.controllers.matrix import MatrixController, decimate, load_detail
from screens.controllers.nodes import NodesController
from screens.controllers.source import LedgerSource, read_state


@pytest.fixture(scope="module")
def lab_ledger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    use_utc()
    return build_lab_ledger(tmp_path_factory.mktemp("ctl") / "ledger.sqlite")


async def _state(path: Path):  # type: ignore[no-untyped-def]
    src = LedgerSource(path)
    await src.open()
    return src, await read_state(src, clock=lambda: FROZEN_NOW)


async def test_dashboard_view_from_ledger(lab_ledger: Path) -> None:
    src, state = await _state(lab_ledger)
    try:
        v = DashboardController(("pi0", "pi1", "pi2", "pi3")).view(state, FROZEN_NOW)
    finally:
        await src.close()
    assert [t.name for t in v.tiles] == ["pi0", "pi1", "pi2", "pi3"]
    assert v.simulated
    assert all(9.0 < (t.watts_value or 0) < 13.0 for t in v.tiles)
    assert v.tiles[2].health == "warn" and "THROTTLED" in v.tiles[2].throttle
    assert v.tiles[0].health == "ok"
    assert v.stage == "benchmark" and v.stage_progress == pytest.approx(0.42)
    assert v.countdown == "2m 42s left"
    assert v.trials == "42/75"
    assert "lost 3" in v.meter and not v.meter_ok
    assert v.tiles[0].spark and len(v.tiles[0].spark) <= 60


def test_resample_bins_by_time_and_keeps_gaps_flat() -> None:
    now = 100.0
    recent = tuple((now - 180 + i, 10.0 if i < 90 else 20.0) for i in range(180))
    out = resample(recent, now, points=6, span_s=180.0)
    assert out == (10.0, 10.0, 10.0, 20.0, 20.0, 20.0)
    assert resample((), now) == ()
    # Samples outside the span are ignored, not squeezed in.
    assert resample(((now - 500, 99.0),), now) == ()


async def test_matrix_view_badges_and_summaries(lab_ledger: Path) -> None:
    src, state = await _state(lab_ledger)
    await src.close()
    v = MatrixController().view(state)
    assert len(v.rows) == 25 and v.reps == 3
    rows = {r.config_id: r for r in v.rows}
    running = list(rows)[RUNNING_CONFIG]
    assert rows[running].cells[0].kind == "running" and rows[running].cells[0].badge == "BENCH 42%"
    assert rows[running].cells[1].kind == "pending"
    (bad_cfg, bad_rep), = INVALID
    assert rows[bad_cfg].cells[bad_rep - 1].kind == "invalid"
    assert rows[bad_cfg].validity == "2/3 valid" and rows[bad_cfg].validity_ok is False
    assert rows["baseline"].validity == "3/3 valid"
    assert rows["drop8_late"].epi == "—"
    assert v.progress == pytest.approx(42 / 75)


async def test_detail_has_trace_window_and_provenance(lab_ledger: Path) -> None:
    src, state = await _state(lab_ledger)
    try:
        trial_id = next(r.trial.id for r in state.results if r.trial.config_id == "baseline" and r.trial.rep == 1)
        d = await load_detail(src, state, trial_id, {str(i): f"pi{i}" for i in range(4)})
        missing = await load_detail(src, state, 10**6, {})
    finally:
        await src.close()
    assert missing is None
    assert d is not None and d.valid is True
    assert [t.node for t in d.traces] == ["pi0", "pi1", "pi2", "pi3"]
    assert d.window_s is not None and 200 < d.window_s < 320
    t = np.array(d.traces[0].t)
    w = np.array(d.traces[0].watts)
    assert t[0] < 0 < d.window_s < t[-1]  # the trace shows a margin around the window
    inside = w[(t > 5) & (t < d.window_s - 5)]
    outside = w[t < -1]
    assert inside.mean() > 9 > 4 > outside.mean()  # busy inside the window, idle around it
    assert dict(d.tasks).keys() == {"arc_challenge", "hellaswag", "mmlu"}
    assert ("strategy", "none") in d.provenance


def test_decimate_never_turns_a_gap_into_zero() -> None:
    t = np.arange(1000.0)
    w = np.full(1000, 10.0)
    w[300:600] = np.nan
    tt, ww = decimate(t, w, points=100)
    assert len(tt) < 100 and np.all(ww == 10.0)
    assert not np.any((tt > 305) & (tt < 595))


def _result(cid: str, experts: int, target: str | None, rep: int, jpt: float, acc: float,
            valid: bool = True) -> TrialResult:
    trial = Trial(id=hash((cid, rep)) % 10**6, campaign_id=1, config_id=cid, rep=rep, ord=experts, experts=experts,
                  target=target, status="done", valid=valid, reasons=(), updated_at=0.0)
    epi = {"energy": {"joules_per_token": jpt}, "accuracy": {"composite": acc}, "epi": {"value": jpt / acc}}
    return TrialResult(trial, None, epi)


def test_curves_optimal_depths_pareto_and_tables() -> None:
    rs = [_result("baseline", 0, None, r, 1.0, 0.80) for r in (1, 2, 3)]
    # Energy falls with depth; accuracy holds to depth 2 (within 1 pt) and drops after.
    for n, (jpt, acc) in enumerate([(0.95, 0.798), (0.90, 0.792), (0.80, 0.75), (0.78, 0.60)], start=1):
        rs += [_result(f"drop{n}_all", n, "all", r, jpt, acc) for r in (1, 2, 3)]
    rs.append(_result("drop4_all", 4, "all", 4, 0.1, 0.99, valid=False))  # invalid: never counted
    rs.append(_result("drop1_late", 1, "late", 1, 1.2, 0.70))  # dominated: more energy, less accuracy
    v = CurvesController(tolerance_pts=1.0).view(rs)
    curve = next(c for c in v.curves if c.target == "all")
    assert [p.experts for p in curve.points] == [0, 1, 2, 3, 4]
    assert curve.epi_optimal == 3  # 0.80/0.75 = 1.067 is the lowest EPI
    assert curve.accuracy_optimal == 2
    assert next(c for c in v.curves if c.target == "early").points == ()  # no early configuration at all
    front = {p.config_id for p in v.pareto if p.on_front}
    assert front == {"baseline", "drop1_all", "drop2_all", "drop3_all", "drop4_all"}
    assert {p.config_id for p in v.pareto if not p.on_front} == {"drop1_late"}
    assert "EPI prunes deeper than accuracy allows" in v.summary
    titles = [t.title for t in v.tables]
    assert titles[0] == "All layers" and titles[-1] == "Best of"
    all_layers = v.tables[0]
    row = next(r for r in all_layers.rows if r[1] == "drop4_all")
    assert row[3] == "3/4"  # the invalid repetition is counted, not used


def test_matrix_and_curves_share_one_analysis_per_results_table() -> None:
    from screens.controllers.curves import AnalysisCache

    rs = [_result("baseline", 0, None, r, 1.0, 0.80) for r in (1, 2, 3)]
    cache = AnalysisCache()
    a = cache.get(rs)
    assert cache.get(list(rs)) is a  # equal results: no new analysis
    assert cache.get(rs + [_result("drop1_all", 1, "all", 1, 0.9, 0.8)]) is not a


async def test_log_controller_reads_incrementally_and_filters(lab_ledger: Path, tmp_path: Path) -> None:
    src = LedgerSource(lab_ledger)
    await src.open()
    ctl = LogController()
    try:
        first = await ctl.poll(src)
        again = await ctl.poll(src)
    finally:
        await src.close()
    assert first and again == []
    total = ctl.view().total
    ctl.min_level = "warning"
    levels = {line.level for line in ctl.view().lines}
    assert levels <= {"warning", "error"} and levels
    ctl.min_level = "debug"
    ctl.text = "INVALID"
    assert all("INVALID" in line.message for line in ctl.view().lines) and ctl.view().shown == 1
    assert ctl.view().total == total


async def _serve_commands(path: Path, answers: dict[str, bool], seen: list[str], stop: asyncio.Event) -> None:
    """The service's side of the command queue (what the lab service does with viewers' commands)."""
    async with await Ledger.open(path) as ledger:
        while not stop.is_set():
            for cmd in await ledger.pending_commands():
                seen.append(cmd.verb)
                await ledger.complete_command(cmd.id, answers.get(cmd.verb, True), {"message": f"{cmd.verb} ok"})
            await asyncio.sleep(0.05)


async def test_commander_round_trip_and_view_only(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    async with await Ledger.open(path):
        pass
    src = LedgerSource(path)
    await src.open()
    seen: list[str] = []
    stop = asyncio.Event()
    service = asyncio.create_task(_serve_commands(path, {"abort": False}, seen, stop))
    try:
        ok = await Commander(src).send(CommandRequest("pause"))
        refused = await Commander(src).send(CommandRequest("abort"))
        view_only = await Commander(src, allow_control=False).send(CommandRequest("resume"))
        unknown = await Commander(src).send(CommandRequest("format_disk"))
        silent = await Commander(src, ack_timeout_s=0.3).send(CommandRequest("start"))
    finally:
        stop.set()
        await service
        await src.close()
    assert ok.ok is True and "pause ok" in ok.message
    assert refused.ok is False and "refused" in refused.message
    assert view_only.ok is False and "view-only" in view_only.message
    assert unknown.ok is False
    assert silent.ok in (True, None)
    assert seen[:2] == ["pause", "abort"] and "resume" not in seen


def test_destructive_commands_ask_first() -> None:
    assert CommandRequest("abort").destructive and CommandRequest("skip", {"config_id": "x"}).destructive
    assert not CommandRequest("pause").destructive and not CommandRequest("start").destructive
    assert "drop3_all" in CommandRequest("skip", {"config_id": "drop3_all"}).describe()


async def test_nodes_controller_history_and_actions(lab_ledger: Path) -> None:
    src, state = await _state(lab_ledger)
    await src.close()
    ctl = NodesController(root="pi0")
    ctl.observe(state.live)
    v = ctl.view(state.live, ("pi0", "pi1", "pi2", "pi3"))
    assert [r.name for r in v.rows] == ["pi0", "pi1", "pi2", "pi3"]
    assert v.rows[2].throttled_now == "freq capped" and len(v.history) == 1
    assert ctl.restart("pi0").verb == "restart_root"
    assert ctl.restart("pi2").args == {"node": "pi2"}
    assert ctl.set_governor("pi1").destructive


def test_themes_builtin_user_and_errors(tmp_path: Path) -> None:
    from themes import builtin_themes, load_user_themes, series_colors

    names = [t.name for t in builtin_themes()]
    assert {"epi-dark", "epi-daylight"} <= set(names)
    for t in builtin_themes():
        assert {"node-ok", "node-fault", "node-0", "node-3", "badge-sim"} <= set(t.variables)
    (tmp_path / "lab.toml").write_text('primary = "#ff0000"\n[variables]\n"node-0" = "#00ff00"\n')
    (user,) = load_user_themes(tmp_path)
    assert user.name == "lab" and user.variables["node-0"] == "#00ff00"
    assert user.variables["node-fault"]  # filled from the default
    assert series_colors(user.variables)[0] == (0, 255, 0)
    (tmp_path / "bad.toml").write_text('primary = "not-a-colour"\n')
    with pytest.raises(ConfigError, match="bad.toml: primary"):
        load_user_themes(tmp_path)
    assert load_user_themes(tmp_path / "missing") == []
    examples = Path(__file__).resolve().parent.parent / "themes" / "examples"
    (amber,) = load_user_themes(examples)
    assert amber.name == "amber-night" and amber.variables["node-0"] == "#FFB000"


def test_campaign_type_is_what_the_ledger_returns() -> None:
    # Guards the controllers' assumption about the record they read the simulated flag from.
    assert "simulated" in Campaign.__dataclass_fields__
    assert math.isfinite(FROZEN_NOW)


async def test_dashboard_view_of_faults(lab_ledger: Path, tmp_path: Path) -> None:
    import shutil

    path = tmp_path / "faults.sqlite"
    shutil.copy(lab_ledger, path)
    await write_fault_live(path)
    src, state = await _state(path)
    await src.close()
    v = DashboardController(("pi0", "pi1", "pi2", "pi3")).view(state, FROZEN_NOW)
    pi1 = v.tiles[1]
    assert pi1.health == "fault" and pi1.watts == "—" and "connection refused" in pi1.throttle
    assert v.cluster_w == "—"  # one node missing: no made-up total
    assert not v.meter_ok and v.meter.startswith("DISCONNECTED")
    assert v.ambient_ok is False and v.suspender == "node pi1 unreachable"
    assert v.stage_progress is None
    # A suspended run's clocks stop: no falling countdown, no ETA; how long it has been suspended instead.
    assert v.countdown == "suspended 40s" and v.eta == "—"


def test_resample_leaves_bins_before_the_first_sample_empty() -> None:
    # A console that just started has 30 s of history: it sits at the right of a 3-minute axis.
    now = 100.0
    out = resample(tuple((now - 30 + i, 3.3) for i in range(30)), now, points=6, span_s=180.0)
    assert out[:5] == (None,) * 5 and out[5] == pytest.approx(3.3)


def test_sparkline_scale_is_fixed_from_zero_so_idle_and_load_read_apart() -> None:
    from screens.controllers.dashboard import SPARK_CEILING_W, spark_ceiling
    from screens.widgets import spark_rows

    idle = spark_rows((3.2, 3.5, 3.2, 3.5), spark_ceiling((3.2, 3.5)), 4, 4)
    load = spark_rows((11.0, 11.0), spark_ceiling((11.0,)), 2, 4)
    # An idle wobble of 0.3 W stays in the bottom row (about a quarter high), not a cliff to the top.
    assert all(row.strip() == "" for row in idle[:2]) and idle[3] == "████" and set(idle[2]) <= {"▁", "▂"}
    assert all(row == "██" for row in load[1:]) and load[0].strip()  # inference near the ceiling: nearly full
    assert spark_ceiling((3.0, 15.0)) == 15.0 and spark_ceiling(()) == SPARK_CEILING_W
    # No sample is blank; 0 W is a bar's foot (different from "no data").
    assert spark_rows((None, 0.0), 12.0, 2, 1) == [" ▁"]


async def test_stale_figures_are_not_shown_as_live(lab_ledger: Path) -> None:
    src, state = await _state(lab_ledger)
    await src.close()
    ctl = DashboardController(("pi0", "pi1", "pi2", "pi3"))
    live_v = ctl.view(state, FROZEN_NOW)
    assert live_v.stale == "" and live_v.tiles[0].watts != "—"
    late = ctl.view(state, FROZEN_NOW + 60)  # the service stopped publishing a minute ago
    assert late.stale == "lab service not answering"
    assert all(t.watts == "—" and t.volts == "—" for t in late.tiles) and late.cluster_w == "—"


def test_matrix_lists_the_plan_before_the_first_campaign() -> None:
    from epiconsole.live import RunLive
    from epiconsole.matrix import pruning_plan
    from screens.controllers.matrix import planned_configs
    from screens.controllers.source import LabState

    ctl = MatrixController(planned=planned_configs(pruning_plan()), plan_name="pruning")
    v = ctl.view(LabState())
    assert len(v.rows) == 25 and v.reps == 3 and v.planned_only
    assert v.rows[0].config_id == "baseline" and v.rows[1].label == "−1 all"
    assert all(c.kind == "pending" and c.trial_id is None for r in v.rows for c in r.cells)
    assert v.progress_text == "0/75 repetitions" and v.plan_name == "pruning"
    assert "press s" in v.current
    # Started, before the first configuration: not "idle".
    starting = ctl.view(LabState(live=replace_run(RunLive(state="running"))))
    assert "preparing" in starting.current


def replace_run(run):  # type: ignore[no-untyped-def]
    from epiconsole.live import LiveSnapshot

    return LiveSnapshot(run=run)


def test_api_probe_timing_out_during_a_benchmark_is_busy_not_down() -> None:
    from epiconsole.live import LiveSnapshot, NodesLive, RunLive

    ctl = NodesController("pi0")
    busy = LiveSnapshot(nodes=NodesLive(api_ok=False), run=RunLive(state="running", stage="benchmark"))
    v = ctl.view(busy)
    assert v.api_ok is None and v.api.startswith("busy")
    down = LiveSnapshot(nodes=NodesLive(api_ok=False), run=RunLive(state="running", stage="deploy"))
    assert ctl.view(down).api_ok is False and ctl.view(down).api == "NOT answering"


def test_benchmark_badge_never_clipped() -> None:
    from epiconsole.live import RunLive
    from screens.controllers.matrix import BADGE_WIDTH, cell_for

    t = Trial(id=1, campaign_id=1, config_id="c", rep=1, ord=0, experts=0, target=None, status="running",
              valid=None, reasons=(), updated_at=0.0)
    r = TrialResult(trial=t, benchmark=None, epi=None)
    for p in (0.0, 0.42, 1.0):
        cell = cell_for(r, RunLive(state="running", config_id="c", repetition=1, stage="benchmark",
                                   stage_progress=p))
        assert len(cell.badge) <= BADGE_WIDTH
    paused = cell_for(r, RunLive(state="paused", config_id="c", repetition=1, stage="benchmark", stage_progress=0.5))
    assert paused.badge == "‖ BENCH"


def test_log_shortens_full_repr_floats_only() -> None:
    from screens.controllers.log import short_floats

    msg = "drop2_all rep 1: 1.5599178442963393 J/token, accuracy 0.8000000000000002, EPI 1.9498973053704238"
    assert short_floats(msg) == "drop2_all rep 1: 1.56 J/token, accuracy 0.8, EPI 1.95"
    # Versions, short figures and identifiers stay as written.
    assert short_floats("epiconsole 0.1.0, 3.25 W, sha 1.23456789abc") == "epiconsole 0.1.0, 3.25 W, sha 1.23456789abc"


async def test_paused_matrix_says_so_and_has_no_eta(lab_ledger: Path) -> None:
    import dataclasses

    src, state = await _state(lab_ledger)
    await src.close()
    paused = dataclasses.replace(state, live=dataclasses.replace(
        state.live, run=dataclasses.replace(state.live.run, state="paused")))
    v = MatrixController().view(paused)
    assert v.current.startswith("PAUSED at ") and v.eta == "—"
    assert MatrixController().view(state).eta == "4h 23m"
