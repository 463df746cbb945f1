"""Curves controller: EPI vs experts dropped per layer target (median and spread), accuracy overlaid,
EPI-optimal and accuracy-optimal depths, the Pareto set of (J/token, accuracy) and the paper's table.

It works from :func:`screens.controllers.results.summarize` (valid repetitions only), so the curves
fill in as results arrive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from screens.controllers import fmt
from screens.controllers.results import ConfigSummary, Spread, summarize

if TYPE_CHECKING:
    from epiconsole.ledger import TrialResult

TARGETS = ("all", "early", "late")


@dataclass(frozen=True)
class CurvePoint:
    experts: int
    epi: Spread
    accuracy: Spread
    jpt: Spread


@dataclass(frozen=True)
class Curve:
    target: str
    points: tuple[CurvePoint, ...]
    #: Depth with the lowest median EPI, and the deepest depth whose accuracy stays within tolerance.
    epi_optimal: int | None
    accuracy_optimal: int | None


@dataclass(frozen=True)
class ParetoPoint:
    config_id: str
    jpt: float
    accuracy: float
    on_front: bool


@dataclass(frozen=True)
class TableRow:
    config_id: str
    experts: str
    target: str
    jpt: str
    accuracy: str
    epi: str
    delta_epi: str
    valid: str


@dataclass(frozen=True)
class CurvesView:
    curves: tuple[Curve, ...]
    pareto: tuple[ParetoPoint, ...]
    table: tuple[TableRow, ...]
    baseline_epi: float | None
    baseline_accuracy: float | None
    tolerance_pts: float
    summary: str
    complete: int
    total: int


def pareto_front(points: list[tuple[str, float, float]]) -> set[str]:
    """Ids of the non-dominated points: no other point has lower-or-equal J/token and higher-or-equal
    accuracy with at least one strictly better."""
    front = set()
    for cid, j, a in points:
        dominated = any((j2 <= j and a2 >= a) and (j2 < j or a2 > a) for c2, j2, a2 in points if c2 != cid)
        if not dominated:
            front.add(cid)
    return front


def _depth(d: int | None) -> str:
    if d is None:
        return "?"
    return "baseline" if d == 0 else f"−{d}"


class CurvesController:
    def __init__(self, tolerance_pts: float = 1.0) -> None:
        self.tolerance_pts = tolerance_pts

    def view(self, results: tuple[TrialResult, ...] | list[TrialResult]) -> CurvesView:
        summaries = summarize(results)
        base = next((s for s in summaries if s.experts == 0), None)
        base_epi = base.epi.median if base else None
        base_acc = base.accuracy.median if base else None
        curves = tuple(self._curve(target, summaries, base) for target in TARGETS)
        pts = [(s.config_id, s.jpt.median, s.accuracy.median) for s in summaries
               if s.jpt.median is not None and s.accuracy.median is not None]
        front = pareto_front(pts)  # type: ignore[arg-type]
        pareto = tuple(ParetoPoint(c, j, a, c in front) for c, j, a in pts)  # type: ignore[arg-type]
        table = tuple(self._row(s, base_epi) for s in summaries)
        complete = sum(1 for s in summaries if s.done == s.reps and s.reps)
        parts = []
        for c in curves:
            if c.epi_optimal is not None or c.accuracy_optimal is not None:
                parts.append(f"{c.target}: EPI-optimal {_depth(c.epi_optimal)}, "
                             f"accuracy-optimal {_depth(c.accuracy_optimal)}")
        return CurvesView(
            curves=curves,
            pareto=pareto,
            table=table,
            baseline_epi=base_epi,
            baseline_accuracy=base_acc,
            tolerance_pts=self.tolerance_pts,
            summary=" · ".join(parts) if parts else "no valid results yet",
            complete=complete,
            total=len(summaries),
        )

    def _curve(self, target: str, summaries: list[ConfigSummary], base: ConfigSummary | None) -> Curve:
        pts: list[CurvePoint] = []
        if base is not None and base.epi.n:
            pts.append(CurvePoint(0, base.epi, base.accuracy, base.jpt))
        for s in summaries:
            if s.target == target and s.experts > 0 and s.epi.n:
                pts.append(CurvePoint(s.experts, s.epi, s.accuracy, s.jpt))
        pts.sort(key=lambda p: p.experts)
        epi_opt = min(pts, key=lambda p: p.epi.median or float("inf")).experts if pts else None
        acc_opt = None
        if base is not None and base.accuracy.median is not None:
            floor = base.accuracy.median - self.tolerance_pts / 100.0
            within = [p.experts for p in pts if p.accuracy.median is not None and p.accuracy.median >= floor]
            acc_opt = max(within) if within else None
        return Curve(target, tuple(pts), epi_opt, acc_opt)

    def _row(self, s: ConfigSummary, base_epi: float | None) -> TableRow:
        delta = fmt.MISSING
        if base_epi and s.epi.median is not None:
            delta = f"{100 * (s.epi.median / base_epi - 1):+.1f}%"
        spread = ""
        if s.epi.n > 1 and s.epi.lo is not None and s.epi.hi is not None:
            spread = f" ±{(s.epi.hi - s.epi.lo) / 2:.3f}"
        return TableRow(
            config_id=s.config_id,
            experts=str(s.experts) if s.experts else "0",
            target=s.target or "—",
            jpt=fmt.num(s.jpt.median, 3),
            accuracy=fmt.pct(s.accuracy.median),
            epi=fmt.num(s.epi.median, 3) + spread,
            delta_epi=delta,
            valid=f"{s.valid}/{s.reps}",
        )
