"""Matrix controller: the plan's configurations x repetitions with a stage badge per repetition,
per-configuration J/token, accuracy, EPI and validity, and the detail view of one repetition."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from epiconsole.live import RunLive
from screens.controllers import fmt
from screens.controllers.curves import AnalysisCache
from screens.controllers.source import TRACE_MARGIN_S, DataSource, LabState

if TYPE_CHECKING:
    import numpy as np

    from epiconsole.ledger import TrialResult

#: Trial statuses the engine writes, grouped by how the matrix shows them.
DONE_STATUSES = frozenset({"done"})
FAILED_STATUSES = frozenset({"failed", "error", "aborted"})
SKIPPED_STATUSES = frozenset({"skipped"})
RUNNING_STATUSES = frozenset({"running", "active", "started"})

#: Short stage names for badges (a cell is narrow).
STAGE_SHORT = {
    "surgery": "SURG",
    "validate": "VALID",
    "convert": "CONV",
    "deploy": "DEPLOY",
    "stabilize": "STAB",
    "benchmark": "BENCH",
    "calculate": "CALC",
    "log": "LOG",
}
#: The widest badge that fits a repetition cell at 80 columns.
BADGE_WIDTH = 9
ACTIVE_RUN_STATES = frozenset({"running", "pausing", "paused", "suspended", "aborting"})
#: Points of the detail view's power trace (the trace is decimated by bin means to this many).
TRACE_POINTS = 400


@dataclass(frozen=True)
class PlannedConfig:
    """A configuration of the lab config's plan, shown as pending rows before the first campaign."""

    config_id: str
    label: str
    repetitions: int


def planned_configs(plan: Any) -> tuple[PlannedConfig, ...]:
    """The rows a :class:`epiconsole.matrix.Plan` will run, in run order."""
    out = []
    for c in plan.configurations:
        label = "baseline" if c.id == "baseline" else (f"−{c.experts} {c.target or ''}".strip() if c.experts
                                                       else c.id)
        out.append(PlannedConfig(c.id, label, plan.repetitions))
    return tuple(out)


@dataclass(frozen=True)
class RepCell:
    #: None for a repetition of the plan that no campaign has created yet.
    trial_id: int | None
    rep: int
    #: done | invalid | failed | skipped | running | pending: the badge's colour class.
    kind: str
    badge: str


@dataclass(frozen=True)
class MatrixRow:
    config_id: str
    label: str
    cells: tuple[RepCell, ...]
    jpt: str
    accuracy: str
    epi: str
    validity: str
    validity_ok: bool | None


@dataclass(frozen=True)
class MatrixView:
    simulated: bool
    plan_name: str
    run_state: str
    progress: float
    progress_text: str
    eta: str
    current: str
    rows: tuple[MatrixRow, ...]
    reps: int
    #: True while the rows come from the lab config's plan (no campaign has created trials yet).
    planned_only: bool = False


def _label(r: TrialResult) -> str:
    t = r.trial
    if not t.experts:
        return "baseline" if t.config_id == "baseline" else t.config_id
    return f"−{t.experts} {t.target or ''}".strip()


def cell_for(r: TrialResult, run: RunLive) -> RepCell:
    t = r.trial
    active = run.state in ACTIVE_RUN_STATES and run.config_id == t.config_id and max(1, run.repetition) == t.rep
    status = t.status
    if active:
        short = STAGE_SHORT.get(run.stage, run.stage.upper()[:6] or "RUN")
        if run.state in ("paused", "suspended", "pausing"):
            short = f"‖ {short}"
        elif run.stage_progress is not None and run.stage == "benchmark":
            with_pct = f"{short} {run.stage_progress * 100:.0f}%"
            short = with_pct if len(with_pct) <= BADGE_WIDTH else short  # a clipped "BENCH 10" misleads
        return RepCell(t.id, t.rep, "running", short)
    if status in DONE_STATUSES or r.epi is not None:
        if t.valid is False:
            return RepCell(t.id, t.rep, "invalid", "✗ invalid")
        return RepCell(t.id, t.rep, "done", "✓ done" if t.valid else "✓ judged?")
    if status in FAILED_STATUSES:
        return RepCell(t.id, t.rep, "failed", "! " + status)
    if status in SKIPPED_STATUSES:
        return RepCell(t.id, t.rep, "skipped", "skipped")
    if status in RUNNING_STATUSES:
        return RepCell(t.id, t.rep, "running", "…")
    return RepCell(t.id, t.rep, "pending", "·")


def _median(s: Any) -> float | None:
    return None if s is None else s.median


class MatrixController:
    """Per-configuration figures come from :mod:`epiconsole.analysis` (the export's numbers)."""

    def __init__(self, cache: AnalysisCache | None = None, planned: tuple[PlannedConfig, ...] = (),
                 plan_name: str = "") -> None:
        self.cache = cache or AnalysisCache()
        self.plan_name = plan_name
        #: The lab config's plan: shown as pending rows until a campaign has trials.
        self.planned = planned

    def view(self, state: LabState) -> MatrixView:
        run = state.live.run
        summaries = {c.config_id: c for c in self.cache.get(state.results).configs} if state.results else {}
        rows: list[MatrixRow] = []
        by_config: dict[str, list[TrialResult]] = {}
        for r in state.results:
            by_config.setdefault(r.trial.config_id, []).append(r)
        reps = 0
        for cid, rs in by_config.items():
            s = summaries[cid]
            reps = max(reps, len(rs))
            judged = s.valid + s.invalid
            if judged:
                validity = f"{s.valid}/{judged} valid"
                ok = s.invalid == 0
            else:
                validity, ok = "", None
            rows.append(
                MatrixRow(
                    config_id=cid,
                    label=_label(rs[0]),
                    cells=tuple(cell_for(r, run) for r in sorted(rs, key=lambda r: r.trial.rep)),
                    jpt=fmt.num(_median(s.jpt), 3),
                    accuracy=fmt.pct(_median(s.accuracy)),
                    epi=fmt.num(_median(s.epi), 3),
                    validity=validity,
                    validity_ok=ok,
                )
            )
        if not rows:
            for p in self.planned:
                rows.append(MatrixRow(p.config_id, p.label, tuple(RepCell(None, r, "pending", "·")
                                                                 for r in range(1, p.repetitions + 1)),
                                      fmt.MISSING, fmt.MISSING, fmt.MISSING, "", None))
                reps = max(reps, p.repetitions)
        total = len(state.results)
        finished = sum(
            1 for r in state.results
            if r.trial.status in DONE_STATUSES | FAILED_STATUSES | SKIPPED_STATUSES or r.epi is not None
        )
        if run.trials_total:
            total, finished = run.trials_total, run.trials_done
        progress = finished / total if total else 0.0
        camp = state.campaign
        if run.config_id and run.state in ACTIVE_RUN_STATES:
            current = f"{run.config_id} rep {max(1, run.repetition)} · {run.stage or '…'}"
            if run.state != "running":  # paused, suspended, …: say so before what it stopped at
                current = f"{run.state.upper()} at {current}"
        elif run.state in ACTIVE_RUN_STATES:
            current = f"{run.state}: preparing the first configuration"
        elif camp and camp.exit_status:
            current = f"campaign {camp.id} {camp.exit_status}"
        else:
            current = "idle — press s to start the matrix" if not camp else "idle"
        if not state.results and self.planned and not camp:
            total = sum(p.repetitions for p in self.planned)
            if run.state not in ACTIVE_RUN_STATES:
                current = (f"not started — press s to run these {len(self.planned)} configurations × "
                           f"{max(p.repetitions for p in self.planned)}")
        return MatrixView(
            simulated=state.live.service.simulated or bool(camp and camp.simulated),
            plan_name=(camp.plan_name if camp else "") or run.plan_name or self.plan_name or "no campaign yet",
            run_state=run.state,
            progress=progress,
            progress_text=f"{finished}/{total} repetitions" if total else "no repetitions",
            planned_only=not state.results and bool(rows),
            # A paused or suspended run has no meaningful ETA (it waits for a person or a condition).
            eta=fmt.duration(run.eta_s) if run.state in ("running", "pausing", "aborting") else fmt.MISSING,
            current=current,
            rows=tuple(rows),
            reps=reps,
        )


# ------------------------------------------------------------------------------------- detail view


@dataclass(frozen=True)
class TraceSeries:
    node: str
    t: tuple[float, ...]
    watts: tuple[float, ...]


@dataclass(frozen=True)
class DetailView:
    trial_id: int
    config_id: str
    rep: int
    status: str
    valid: bool | None
    reasons: tuple[str, ...]
    jpt: str
    accuracy: str
    epi: str
    tasks: tuple[tuple[str, str], ...]
    stages: tuple[tuple[str, str, str], ...]
    #: Seconds relative to the window's begin; the window is [0, window_s].
    traces: tuple[TraceSeries, ...]
    window_s: float | None
    provenance: tuple[tuple[str, str], ...]


def decimate(t: np.ndarray, w: np.ndarray, points: int = TRACE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Bin means to at most ``points`` points (NaN bins dropped: a gap stays a gap, never zero)."""
    import numpy as np

    if len(t) <= points:
        keep = np.isfinite(w)
        return t[keep], w[keep]
    edges = np.linspace(t[0], t[-1], points + 1)
    idx = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, points - 1)
    good = np.isfinite(w)
    sums = np.bincount(idx[good], weights=w[good], minlength=points)
    counts = np.bincount(idx[good], minlength=points)
    tsum = np.bincount(idx[good], weights=t[good], minlength=points)
    ok = counts > 0
    return tsum[ok] / counts[ok], sums[ok] / counts[ok]


def _flatten(prefix: str, value: object, out: list[tuple[str, str]]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out.append((prefix, str(value)))


async def load_detail(
    source: DataSource, state: LabState, trial_id: int, channels: dict[str, str]
) -> DetailView | None:
    """Everything the detail view shows about one repetition (None if the trial is unknown)."""
    result = next((r for r in state.results if r.trial.id == trial_id), None)
    if result is None:
        return None
    from epiconsole.analysis import repetition  # the export's reading of a stored result

    t = result.trial
    rep = repetition(result)
    checkpoints = await source.checkpoints(trial_id)
    latest: dict[str, tuple[str, float]] = {}
    for c in checkpoints:
        latest[c.stage] = (c.status, c.t)
    stages = tuple((stage, status, fmt.clock(at)) for stage, (status, at) in latest.items())
    markers = await source.markers(trial_id)
    begin = next((m.t for m in reversed(markers) if m.kind == "begin"), None)
    end = next((m.t for m in reversed(markers) if m.kind == "end" and begin is not None and m.t >= begin), None)
    traces: list[TraceSeries] = []
    window_s = None
    if begin is not None:
        stop = end if end is not None else state.read_at
        block = await source.samples(begin - TRACE_MARGIN_S, stop + TRACE_MARGIN_S)
        window_s = (end - begin) if end is not None else None
        if block.n:
            for ch in range(block.channels):
                node = channels.get(str(ch), f"ch{ch}")
                tt, ww = decimate(block.t - begin, block.W[:, ch])
                traces.append(TraceSeries(node, tuple(float(x) for x in tt), tuple(float(x) for x in ww)))
    prov: list[tuple[str, str]] = []
    for scope, sid in (("trial", trial_id), ("config", t.config_id)):
        data = await source.provenance(scope, sid)
        if data:
            _flatten("", data, prov)
    if state.campaign:
        _flatten("campaign", state.campaign.provenance, prov)
    return DetailView(
        trial_id=trial_id,
        config_id=t.config_id,
        rep=t.rep,
        status=t.status,
        valid=t.valid,
        reasons=t.reasons,
        jpt=fmt.num(rep.jpt, 3),  # the label says J/token
        accuracy=fmt.pct(rep.accuracy),
        epi=fmt.num(rep.epi, 3),
        tasks=tuple((k, fmt.pct(v)) for k, v in sorted(rep.tasks)),
        stages=stages,
        traces=tuple(traces),
        window_s=window_s,
        provenance=tuple(prov[:40]),
    )
