"""Curves controller: EPI vs experts dropped per layer target (median and spread), accuracy overlaid,
EPI-optimal and accuracy-optimal depths, the Pareto set of (J/token, accuracy) and the paper's tables.

The figures come from :func:`epiconsole.analysis.analyze`, the same code ``epiconsole export`` and the
report use, so the console never disagrees with the paper's tables. The analysis runs only when the
results changed (they change at stage boundaries, the console polls much faster).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from epiconsole.analysis import Analysis, Table
    from epiconsole.ledger import TrialResult

TARGETS = ("all", "early", "late")


@dataclass(frozen=True)
class Band:
    """Median and range of a figure over valid repetitions."""

    median: float
    lo: float
    hi: float
    n: int


@dataclass(frozen=True)
class CurvePoint:
    experts: int
    config_id: str
    epi: Band
    accuracy: Band | None
    jpt: Band | None


@dataclass(frozen=True)
class Curve:
    target: str
    points: tuple[CurvePoint, ...]
    epi_optimal: int | None
    accuracy_optimal: int | None


@dataclass(frozen=True)
class ParetoPoint:
    config_id: str
    jpt: float
    accuracy: float
    on_front: bool


@dataclass(frozen=True)
class CurvesView:
    curves: tuple[Curve, ...]
    pareto: tuple[ParetoPoint, ...]
    tables: tuple[Table, ...]
    baseline_id: str | None
    tolerance_pts: float
    summary: str
    complete: int
    total: int


def _band(s: Any) -> Band | None:
    return None if s is None else Band(s.median, s.lo, s.hi, s.n)


def _depth(d: int | None) -> str:
    if d is None:
        return "?"
    return "baseline" if d == 0 else f"−{d}"


class AnalysisCache:
    """``analyze`` once per distinct results table (shared by the Matrix and Curves controllers)."""

    def __init__(self, tolerance_pts: float = 1.0) -> None:
        self.tolerance_pts = tolerance_pts
        self._key: tuple[TrialResult, ...] | None = None
        self._analysis: Analysis | None = None

    def get(self, results: Sequence[TrialResult]) -> Analysis:
        key = tuple(results)
        if self._analysis is None or key != self._key:
            from epiconsole.analysis import analyze  # loads numpy: only once a results screen is shown

            self._analysis = analyze(key, tolerance_pts=self.tolerance_pts)
            self._key = key
        return self._analysis


class CurvesController:
    def __init__(self, tolerance_pts: float = 1.0, cache: AnalysisCache | None = None) -> None:
        self.tolerance_pts = tolerance_pts
        self.cache = cache or AnalysisCache(tolerance_pts)

    def view(self, results: Sequence[TrialResult]) -> CurvesView:
        a = self.cache.get(results)
        depths = {d.target: d for d in a.depths}
        curves = []
        for target in TARGETS:
            curve = next((c for c in a.curves if c.target == target), None)
            points = ()
            if curve is not None:
                points = tuple(
                    CurvePoint(p.experts, p.config_id, _band(p.epi), _band(p.accuracy), _band(p.jpt))  # type: ignore[arg-type]
                    for p in curve.points
                )
            d = depths.get(target)
            curves.append(Curve(target, points, d.epi_optimal if d else None, d.accuracy_optimal if d else None))
        front = set(a.pareto)
        pareto = tuple(
            ParetoPoint(c.config_id, c.jpt.median, c.accuracy.median, c.config_id in front)
            for c in a.configs
            if c.jpt is not None and c.accuracy is not None
        )
        parts = []
        for c in curves:
            if c.epi_optimal is not None or c.accuracy_optimal is not None:
                tension = "  ← EPI prunes deeper than accuracy allows" if (
                    c.epi_optimal is not None and c.accuracy_optimal is not None and c.epi_optimal > c.accuracy_optimal
                ) else ""
                parts.append(f"{c.target}: EPI-optimal {_depth(c.epi_optimal)}, "
                             f"accuracy-optimal {_depth(c.accuracy_optimal)}{tension}")
        complete = sum(1 for c in a.configs if c.repetitions and c.pending == 0)
        return CurvesView(
            curves=tuple(curves),
            pareto=pareto,
            tables=a.tables,
            baseline_id=a.baseline_id,
            tolerance_pts=self.tolerance_pts,
            summary=" · ".join(parts) if parts else "no valid results yet",
            complete=complete,
            total=len(a.configs),
        )
