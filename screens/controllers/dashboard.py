"""Dashboard controller: per-node tiles, cluster totals, the current stage and the meter's health."""

from __future__ import annotations

from dataclasses import dataclass, replace

from epiconsole.live import LiveSnapshot, NodeLive, RunLive
from screens.controllers import fmt
from screens.controllers.source import LabState

#: Sparkline length: the tile shows the last few minutes resampled to this many points.
SPARK_POINTS = 60
#: How much history the sparkline covers.
SPARK_SPAN_S = 180.0
#: The sparkline's scale runs from 0 W to at least this: a Pi 5 idles near 3 W and serves inference
#: near 11 W, so on a fixed scale idle and load read apart at a glance and a 0.3 W wobble stays small.
SPARK_CEILING_W = 12.0
#: Live electrical figures older than this (or with the meter disconnected) are shown as missing:
#: a frozen number must never pass for a live one.
STALE_AFTER_S = 3.0
#: The staleness of a service that stopped publishing: the run's state on screen is its last too.
SERVICE_SILENT = "lab service not answering"
#: Run states in which stage countdowns and the campaign ETA mean something.
MOVING_RUN_STATES = frozenset({"running", "pausing", "aborting"})


@dataclass(frozen=True)
class NodeTileView:
    name: str
    role: str
    #: Index of the node's series colour (``node-0`` .. ``node-3``).
    series: int
    watts: str
    watts_value: float | None
    mean_10s: str
    volts: str
    amps: str
    pf: str
    temp: str
    clock: str
    governor: str
    throttle: str
    #: ok | warn | fault | unknown: the tile's border colour.
    health: str
    #: Mean watts per time bin over the last :data:`SPARK_SPAN_S` (None: no sample in that bin yet).
    spark: tuple[float | None, ...]
    #: Top of the sparkline's 0 W-based scale: ``max(SPARK_CEILING_W, data max)``.
    spark_ceiling: float = SPARK_CEILING_W


@dataclass(frozen=True)
class DashboardView:
    simulated: bool
    lab_name: str
    service: str
    tiles: tuple[NodeTileView, ...]
    cluster_w: str
    window_j: str
    live_jpt: str
    window_tokens: str
    run_state: str
    run_line: str
    stage: str
    stage_progress: float | None
    countdown: str
    trials: str
    eta: str
    suspender: str
    ambient: str
    ambient_ok: bool | None
    meter: str
    meter_ok: bool
    #: Why the electrical figures are not live ("" when they are): they show as missing then.
    stale: str = ""


def resample(recent: tuple[tuple[float, float], ...], now: float, points: int = SPARK_POINTS,
             span_s: float = SPARK_SPAN_S) -> tuple[float | None, ...]:
    """Mean watts per time bin over the last ``span_s`` seconds, always ``points`` bins (or none at all).

    Binning by time (not by sample count) keeps the sparkline's x axis honest: bins before the first
    sample stay None (a console that just started shows a short trace at the right, not one stretched
    over three minutes); empty bins after it repeat the previous value (the service publishes recent
    watts at a lower rate than the bins).
    """
    if not recent:
        return ()
    t0 = now - span_s
    sums = [0.0] * points
    counts = [0] * points
    width = span_s / points
    for t, w in recent:
        if t < t0 or t > now:
            continue
        i = min(points - 1, int((t - t0) / width))
        sums[i] += w
        counts[i] += 1
    if not any(counts):
        return ()
    out: list[float | None] = []
    last: float | None = None
    for s, c in zip(sums, counts, strict=True):
        if c:
            last = s / c
        out.append(last)
    return tuple(out)


def spark_ceiling(spark: tuple[float | None, ...]) -> float:
    """The sparkline's scale top: the fixed ceiling, raised only when the data goes above it."""
    return max([SPARK_CEILING_W, *(w for w in spark if w is not None)])


def staleness(live: LiveSnapshot, now: float) -> str:
    """Why the electrical figures are not live, or "" when they are."""
    if live.service.pid and not live.service.alive(now):
        return SERVICE_SILENT
    m = live.meter
    if not m.connected:
        return "meter disconnected"
    if m.last_sample and now - m.last_sample > STALE_AFTER_S:
        return f"no reading for {fmt.duration(now - m.last_sample)}"
    return ""


def node_health(n: NodeLive, temp_max: float) -> str:
    if n.ssh_ok is False or (n.process_running is False and n.role):
        return "fault"
    if n.throttled_now or (n.temp_c is not None and n.temp_c >= temp_max):
        return "warn"
    if n.ssh_ok is None and n.W is None:
        return "unknown"
    return "ok"


def tile(n: NodeLive, series: int, now: float, temp_max: float, stale: str = "") -> NodeTileView:
    """One node's tile; with ``stale`` set the electrical figures show as missing (never frozen)."""
    if stale:
        n = replace(n, W=None, W_mean_10s=None, V=None, A=None, PF=None)
    if n.ssh_ok is False:
        throttle = f"unreachable: {n.ssh_error}" if n.ssh_error else "unreachable"
    elif n.throttled_now:
        throttle = "THROTTLED " + ", ".join(n.throttled_now)
    elif n.throttled_since:
        throttle = "ok (earlier: " + ", ".join(n.throttled_since) + ")"
    else:
        throttle = "not throttled" if n.ssh_ok else fmt.MISSING
    return NodeTileView(
        name=n.name,
        role=n.role or "node",
        series=series,
        watts=fmt.num(n.W, 1),
        watts_value=n.W,
        mean_10s=fmt.num(n.W_mean_10s, 1, "W"),  # the same precision as the live watts beside it
        volts=fmt.num(n.V, 1, "V"),
        amps=fmt.num(n.A, 3, "A"),
        pf=fmt.num(n.PF, 2),
        temp=fmt.num(n.temp_c, 1, "°C"),
        clock=fmt.ghz(n.arm_hz),
        governor=n.governor or fmt.MISSING,
        throttle=throttle,
        health=node_health(n, temp_max),
        spark=(spark := resample(n.recent, now)),
        spark_ceiling=spark_ceiling(spark),
    )


def meter_line(live: LiveSnapshot) -> tuple[str, bool]:
    m = live.meter
    rate = f"{m.rate_hz:.0f} Hz" if m.rate_hz >= 10 else f"{m.rate_hz:.1f} Hz"  # the sim runs slow
    if not m.connected:
        # The port last: on a narrow screen it is what gets cut, not the state.
        return "DISCONNECTED · reconnects " + str(m.reconnects) + (f" · {m.port}" if m.port else ""), False
    parts = [
        rate,
        f"lost {m.lost_lines}",
        f"bad {m.bad_lines}",
        f"reconnects {m.reconnects}",
    ]
    if m.reboots:
        parts.append(f"reboots {m.reboots}")
    return " · ".join(parts), m.lost_lines == 0 and m.bad_lines == 0


def stage_progress(run: RunLive, now: float) -> float | None:
    """The stage's own progress when the engine reports it, else elapsed time over the expected span."""
    if run.stage_progress is not None:
        return max(0.0, min(1.0, run.stage_progress))
    if run.stage_eta and run.stage_started and run.stage_eta > run.stage_started:
        return max(0.0, min(1.0, (now - run.stage_started) / (run.stage_eta - run.stage_started)))
    return None


class DashboardController:
    """Turns a :class:`LabState` into a :class:`DashboardView`."""

    def __init__(self, node_order: tuple[str, ...] = (), temp_max_c: float = 80.0) -> None:
        self.node_order = node_order
        self.temp_max_c = temp_max_c

    def view(self, state: LabState, now: float, *, attached: bool = False) -> DashboardView:
        live = state.live
        nodes = live.nodes.nodes
        order = [n for n in self.node_order if n in nodes] + sorted(n for n in nodes if n not in self.node_order)
        stale = staleness(live, now)
        tiles = tuple(tile(nodes[name], i, now, self.temp_max_c, stale) for i, name in enumerate(order))
        run = live.run
        cluster = None if stale else live.nodes.cluster_W
        if cluster is None and tiles and all(t.watts_value is not None for t in tiles):
            cluster = sum(t.watts_value or 0.0 for t in tiles)
        run_line = f"{run.config_id} · rep {run.repetition}" if run.config_id else "no configuration running"
        countdown = (f"{fmt.duration(run.stage_eta - now)} left" if run.stage and run.stage_eta and run.stage_eta > now
                     else "")
        if not countdown and run.stage and run.stage_started:
            countdown = f"{fmt.duration(now - run.stage_started)} in stage"
        moving = run.state in MOVING_RUN_STATES
        if not moving and run.state in ("paused", "suspended"):
            # The clocks stop with the run: a countdown that kept falling would promise an end that is not coming.
            since = f" {fmt.duration(now - run.suspended_since)}" if run.suspended_since else ""
            countdown = f"{run.state}{since}"
        meter, meter_ok = meter_line(live)
        amb = live.ambient
        svc = live.service
        if not svc.pid:
            service = "no lab service"
        elif not svc.alive(now):
            service = "lab service not answering"
        else:
            service = ("viewer of " if attached else "") + (svc.lab_name or "lab service")
        return DashboardView(
            simulated=svc.simulated,
            lab_name=svc.lab_name,
            service=service,
            tiles=tiles,
            cluster_w=fmt.num(cluster, 1),
            window_j=fmt.joules(run.window_joules),
            live_jpt=fmt.num(run.live_jpt, 2, "J/tok"),
            window_tokens=f"{run.window_tokens:,} tok" if run.window_tokens else fmt.MISSING,
            run_state=run.state,
            run_line=run_line,
            stage=run.stage or fmt.MISSING,
            stage_progress=stage_progress(run, now),
            countdown=countdown,
            trials=f"{run.trials_done}/{run.trials_total}" if run.trials_total else fmt.MISSING,
            eta=fmt.duration(run.eta_s) if moving else fmt.MISSING,
            suspender=run.suspender,
            ambient=fmt.num(amb.temp_c, 1, "°C"),
            ambient_ok=amb.in_band,
            meter=meter,
            meter_ok=meter_ok,
            stale=stale,
        )
