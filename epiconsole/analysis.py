"""Analysis of a campaign's results: what the Curves screen shows and the report prints.

Pure: it takes the ledger's plain records (:class:`~epiconsole.ledger.TrialResult`, as
``Ledger.results(campaign_id)`` returns them) and returns frozen dataclasses, with no I/O, so the TUI's
controller, ``epiconsole export`` and the tests share one implementation.

* :func:`repetitions` reads each trial's stored results (the seed EPI schema the engine writes:
  ``energy{…}``, ``accuracy{…, composite}``, ``epi{value}``, ``validity{valid, reasons}``) into a
  :class:`Repetition`.
* :func:`analyze` summarises per configuration over the *valid* repetitions (median and min–max
  spread; invalid ones are excluded but counted), relates every configuration to the baseline (change
  in %, accuracy in points, the log-decomposition of the energy change into power and time), builds
  one curve per layer target (x = experts dropped, the baseline at 0), the EPI-optimal and the
  accuracy-optimal depth per target, the Pareto set of (J/token, accuracy) over all configurations and
  the paper's tables (all layers, early only, late only, best-of).

The statistics themselves (summaries, change vs baseline, optimal depths, Pareto, log decomposition)
come from :mod:`epiconsole.epi`; this module only arranges them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from epiconsole import epi as epimath
from epiconsole.matrix import TARGETS

#: Keys of the EPI result's ``accuracy`` section that are not tasks.
_NOT_TASKS = frozenset({"composite", "stderr", "weights", "metric", "metrics", "n", "items"})


# ------------------------------------------------------------------------------------------ records


@dataclass(frozen=True)
class Repetition:
    """One repetition's figures as stored in the ledger (None where missing, never 0)."""

    trial_id: int
    config_id: str
    ord: int
    rep: int
    experts: int
    target: str | None
    strategy: str | None
    status: str
    valid: bool | None
    reasons: tuple[str, ...]
    joules: float | None = None
    tokens: int | None = None
    jpt: float | None = None
    #: Composite accuracy in [0, 1].
    accuracy: float | None = None
    #: Per-task accuracy in [0, 1], in the order stored.
    tasks: tuple[tuple[str, float], ...] = ()
    epi: float | None = None
    duration_s: float | None = None
    avg_watts: float | None = None
    peak_watts: float | None = None
    window: tuple[float, float] | None = None
    #: Standard error of the composite accuracy (tasks independent), when the benchmark reported one.
    accuracy_stderr: float | None = None

    @property
    def seconds_per_token(self) -> float | None:
        """Window seconds per counted token (the time part of J/token = watts x s/token)."""
        if self.duration_s is None or not self.tokens:
            return None
        return self.duration_s / self.tokens

    @property
    def usable(self) -> bool:
        """Counts in the summaries: finished, judged valid, with J/token and accuracy.

        Not "with an EPI figure": a valid repetition scoring 0 has no EPI (division by zero), yet
        its accuracy and J/token are real and belong in the medians (a broken prune must show 0 %,
        not vanish from the tables).
        """
        return self.status == "done" and self.valid is True and self.jpt is not None and self.accuracy is not None

    @property
    def judged_invalid(self) -> bool:
        return self.status == "done" and self.valid is False


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, Mapping):
        for key in ("value", "acc", "accuracy", "score"):
            if key in value:
                return _num(value[key])
    return None


def _section(d: Mapping[str, Any] | None, key: str) -> Mapping[str, Any]:
    v = (d or {}).get(key)
    return v if isinstance(v, Mapping) else {}


def task_accuracies(accuracy: Mapping[str, Any]) -> tuple[tuple[str, float], ...]:
    """``(task, accuracy)`` pairs from an ``accuracy`` section, leaving out the composite and metadata."""
    out = []
    for name, value in accuracy.items():
        v = _num(value)
        if name not in _NOT_TASKS and v is not None:
            out.append((str(name), v))
    return tuple(out)


def _composite_stderr(accuracy: Mapping[str, Any], bench: Mapping[str, Any]) -> float | None:
    """Standard error of the composite: each task's reported one, else the binomial one from its item
    count; a task with neither leaves the composite's unknown."""
    stderr = _section(accuracy, "stderr")
    details = _section(bench, "task_details")
    per_task: dict[str, float | None] = {}
    for name, acc in task_accuracies(accuracy):
        se = _num(stderr.get(name))
        per_task[name] = se if se is not None else epimath.accuracy_stderr(acc, _num(_section(details, name).get("n")))
    weights = {k: _num(_section(details, k).get("weight")) for k in per_task}
    try:
        return epimath.composite_stderr(
            per_task, None if any(w is None for w in weights.values()) else weights  # type: ignore[arg-type]
        )
    except ValueError:  # weights the benchmark recorded that cannot weigh (all zero): no figure
        return None


def repetition(result: Any) -> Repetition:
    """A :class:`Repetition` from one ``TrialResult`` (trial, benchmark dict, EPI dict)."""
    trial = result.trial
    epi = result.epi or {}
    bench = result.benchmark or {}
    energy = _section(epi, "energy")
    acc = _section(epi, "accuracy") or _section(bench, "accuracy")
    value = _section(epi, "epi")
    composite = _num(acc.get("composite"))
    if composite is None:
        composite = _num(bench.get("composite"))
    tokens = _num(energy.get("total_tokens"))
    w = _section(bench, "window")
    t0, t1 = _num(w.get("t0")), _num(w.get("t1"))
    return Repetition(
        trial_id=trial.id,
        config_id=trial.config_id,
        ord=trial.ord,
        rep=trial.rep,
        experts=int(trial.experts or 0),
        target=trial.target,
        strategy=(trial.config or {}).get("strategy"),
        status=trial.status,
        valid=trial.valid,
        reasons=tuple(trial.reasons),
        joules=_num(energy.get("total_joules")),
        tokens=None if tokens is None else int(tokens),
        jpt=_num(energy.get("joules_per_token")) or _num(value.get("joules_per_token")),
        accuracy=composite,
        tasks=task_accuracies(acc),
        epi=_num(value.get("value")),
        duration_s=_num(energy.get("duration_seconds")),
        avg_watts=_num(energy.get("avg_watts_cluster")),
        peak_watts=_num(energy.get("peak_watts_cluster")),
        window=(t0, t1) if t0 is not None and t1 is not None else None,
        accuracy_stderr=_composite_stderr(acc, bench),
    )


def repetitions(results: Iterable[Any]) -> list[Repetition]:
    """Every trial of a campaign as a :class:`Repetition`, in run order."""
    return [repetition(r) for r in results]


# ------------------------------------------------------------------------------------------ values


@dataclass(frozen=True)
class Spread:
    """Median and range of one figure over a configuration's valid repetitions."""

    median: float
    lo: float
    hi: float
    n: int


@dataclass(frozen=True)
class Decomposition:
    """Energy-per-token change vs baseline split into power and time: dlnE = dlnP + dlnt (exact)."""

    d_ln_energy: float
    d_ln_power: float
    d_ln_time: float


@dataclass(frozen=True)
class ConfigSummary:
    config_id: str
    ord: int
    experts: int
    target: str | None
    strategy: str | None
    repetitions: int
    valid: int
    invalid: int
    failed: int
    pending: int
    jpt: Spread | None
    accuracy: Spread | None
    epi: Spread | None
    joules: Spread | None
    tokens: Spread | None
    duration_s: Spread | None
    avg_watts: Spread | None
    seconds_per_token: Spread | None
    #: Median per-task accuracy over valid repetitions.
    tasks: tuple[tuple[str, float], ...]
    #: Change of the medians vs the baseline's (None for the baseline itself or without data).
    jpt_change_pct: float | None = None
    epi_change_pct: float | None = None
    accuracy_change_pts: float | None = None
    decomposition: Decomposition | None = None
    #: Reasons of invalid repetitions (de-duplicated, in order), for the report.
    invalid_reasons: tuple[str, ...] = ()
    #: Median relative standard uncertainty of one repetition's EPI, in percent (meter and accuracy).
    epi_uncertainty_pct: float | None = None


@dataclass(frozen=True)
class CurvePoint:
    experts: int
    config_id: str
    epi: Spread
    jpt: Spread | None
    accuracy: Spread | None


@dataclass(frozen=True)
class Curve:
    """EPI vs experts dropped for one layer target; the baseline is the point at 0."""

    target: str
    points: tuple[CurvePoint, ...]


@dataclass(frozen=True)
class Depths:
    """EPI-optimal vs accuracy-optimal depth for one target (None when the curve has no data)."""

    target: str
    epi_optimal: int | None
    epi_optimal_id: str | None
    epi_optimal_value: float | None
    accuracy_optimal: int | None
    accuracy_optimal_id: str | None
    tolerance_pts: float

    @property
    def tension(self) -> bool:
        """True when minimising EPI prunes deeper than accuracy allows (the paper's point)."""
        return (self.epi_optimal is not None and self.accuracy_optimal is not None
                and self.epi_optimal > self.accuracy_optimal)


@dataclass(frozen=True)
class Table:
    """A results table as text cells: the TUI puts it in a DataTable, the report prints markdown."""

    title: str
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    note: str = ""


@dataclass(frozen=True)
class Analysis:
    campaign_id: int | None
    simulated: bool
    tolerance_pts: float
    repetitions: tuple[Repetition, ...]
    configs: tuple[ConfigSummary, ...]
    baseline_id: str | None
    curves: tuple[Curve, ...]
    depths: tuple[Depths, ...]
    #: Config ids on the (J/token, accuracy) Pareto frontier, by increasing J/token.
    pareto: tuple[str, ...]
    tables: tuple[Table, ...]

    def config(self, config_id: str) -> ConfigSummary:
        for c in self.configs:
            if c.config_id == config_id:
                return c
        raise KeyError(config_id)

    @property
    def counts(self) -> dict[str, int]:
        reps = self.repetitions
        return {
            "repetitions": len(reps),
            "valid": sum(1 for r in reps if r.usable),
            "invalid": sum(1 for r in reps if r.judged_invalid),
            "failed": sum(1 for r in reps if r.status == "failed"),
            "pending": sum(1 for r in reps if r.status in ("pending", "running")),
        }


# ------------------------------------------------------------------------------------------ analysis


def _spread(values: Sequence[float | None]) -> Spread | None:
    s = epimath.summarize(values)
    if s.median is None or s.min is None or s.max is None:
        return None
    return Spread(median=s.median, lo=s.min, hi=s.max, n=s.n)


def _median_tasks(reps: Sequence[Repetition]) -> tuple[tuple[str, float], ...]:
    names: list[str] = []
    for r in reps:
        names += [n for n, _ in r.tasks if n not in names]
    out = []
    for name in names:
        s = _spread([dict(r.tasks).get(name) for r in reps])
        if s is not None:
            out.append((name, s.median))
    return tuple(out)


def _summarize(config_id: str, reps: Sequence[Repetition], meter_pct: float | None) -> ConfigSummary:
    first = reps[0]
    good = [r for r in reps if r.usable]
    reasons: list[str] = []
    for r in reps:
        if r.judged_invalid or r.status == "failed":
            reasons += [x for x in r.reasons if x not in reasons]
    return ConfigSummary(
        config_id=config_id,
        ord=first.ord,
        experts=first.experts,
        target=first.target,
        strategy=first.strategy,
        repetitions=len(reps),
        valid=len(good),
        invalid=sum(1 for r in reps if r.judged_invalid),
        failed=sum(1 for r in reps if r.status == "failed"),
        pending=sum(1 for r in reps if r.status in ("pending", "running")),
        jpt=_spread([r.jpt for r in good]),
        accuracy=_spread([r.accuracy for r in good]),
        epi=_spread([r.epi for r in good]),
        joules=_spread([r.joules for r in good]),
        tokens=_spread([None if r.tokens is None else float(r.tokens) for r in good]),
        duration_s=_spread([r.duration_s for r in good]),
        avg_watts=_spread([r.avg_watts for r in good]),
        seconds_per_token=_spread([r.seconds_per_token for r in good]),
        tasks=_median_tasks(good),
        invalid_reasons=tuple(reasons),
        epi_uncertainty_pct=_uncertainty_pct(good, meter_pct),
    )


def _uncertainty_pct(reps: Sequence[Repetition], meter_pct: float | None) -> float | None:
    rel = [epimath.epi_relative_uncertainty(meter_pct, r.accuracy, r.accuracy_stderr) for r in reps]
    s = _spread([None if u is None else u * 100.0 for u in rel])
    return None if s is None else s.median


def _relate(c: ConfigSummary, base: ConfigSummary | None) -> ConfigSummary:
    """Fill the change-vs-baseline fields of ``c``."""
    if base is None or c.config_id == base.config_id:
        return c

    def med(s: Spread | None) -> float | None:
        return None if s is None else s.median

    acc_pts = None
    if c.accuracy is not None and base.accuracy is not None:
        acc_pts = (c.accuracy.median - base.accuracy.median) * 100.0
    decomposition = None
    # Per token (E = J/token, t = s/token), so the split adds up to the J/token change the tables show.
    d = epimath.decompose_energy(med(c.jpt), med(c.seconds_per_token), med(base.jpt), med(base.seconds_per_token))
    if d is not None:
        decomposition = Decomposition(d.dlnE, d.dlnP, d.dlnt)
    return replace(
        c,
        jpt_change_pct=epimath.change_pct(med(c.jpt), med(base.jpt)),
        epi_change_pct=epimath.change_pct(med(c.epi), med(base.epi)),
        accuracy_change_pts=acc_pts,
        decomposition=decomposition,
    )


def _baseline(configs: Sequence[ConfigSummary]) -> ConfigSummary | None:
    unmodified = [c for c in configs if c.experts == 0]
    named = [c for c in unmodified if c.config_id == "baseline"]
    return (named or unmodified or [None])[0]


def _curves(configs: Sequence[ConfigSummary], base: ConfigSummary | None) -> list[Curve]:
    curves = []
    for target in TARGETS:
        members = sorted((c for c in configs if c.target == target and c.experts > 0), key=lambda c: c.experts)
        if not members:
            continue
        pts = [base] if base is not None else []
        pts += members
        points = tuple(CurvePoint(c.experts, c.config_id, c.epi, c.jpt, c.accuracy) for c in pts if c.epi)
        curves.append(Curve(target, points))
    return curves


def _depths(curves: Sequence[Curve], configs: Sequence[ConfigSummary], base: ConfigSummary | None,
            tolerance_pts: float) -> list[Depths]:
    def med(x: Spread | None) -> float | None:
        return None if x is None else x.median

    rows = [{"config_id": c.config_id, "experts": c.experts, "target": c.target, "epi": med(c.epi),
             "accuracy": med(c.accuracy)} for c in configs if c.experts > 0 and c.target]
    if base is not None:
        # The baseline is depth 0 of every curve (epi.optimal_depths knows it by its missing target).
        rows.append({"config_id": base.config_id, "experts": 0, "target": None, "epi": med(base.epi),
                     "accuracy": med(base.accuracy)})
    found = epimath.optimal_depths(rows, tolerance_pts)
    out = []
    for curve in curves:
        d = found.get(curve.target)
        by_id = {p.config_id: p for p in curve.points}
        best = by_id.get(d.epi_optimal_config) if d and d.epi_optimal_config else None
        out.append(Depths(
            target=curve.target,
            epi_optimal=d.epi_optimal if d else None,
            epi_optimal_id=d.epi_optimal_config if d else None,
            epi_optimal_value=best.epi.median if best else None,
            accuracy_optimal=d.accuracy_optimal if d else None,
            accuracy_optimal_id=d.accuracy_optimal_config if d else None,
            tolerance_pts=tolerance_pts,
        ))
    return out


def analyze(
    results: Iterable[Any],
    *,
    tolerance_pts: float = 1.0,
    simulated: bool = False,
    campaign_id: int | None = None,
    meter_uncertainty_pct: float | None = None,
) -> Analysis:
    """The whole analysis of one campaign's results (``Ledger.results(campaign_id)``).

    ``meter_uncertainty_pct`` (the board's stated uncertainty, from its info line) enables the EPI
    uncertainty column; without it the column stays empty rather than pretending the meter is exact.
    """
    reps = repetitions(results)
    groups: dict[str, list[Repetition]] = {}
    for r in sorted(reps, key=lambda r: (r.ord, r.rep)):
        groups.setdefault(r.config_id, []).append(r)
    configs = [_summarize(cid, rs, meter_uncertainty_pct) for cid, rs in groups.items()]
    base = _baseline(configs)
    configs = [_relate(c, base) for c in configs]
    base = _baseline(configs)
    curves = _curves(configs, base)
    depths = tuple(_depths(curves, configs, base, tolerance_pts))
    usable = [c for c in configs if c.jpt is not None and c.accuracy is not None]
    front = epimath.pareto_front([(c.jpt.median, c.accuracy.median) for c in usable])  # type: ignore[union-attr]
    pareto = tuple(usable[i].config_id for i in front)
    partial = Analysis(
        campaign_id=campaign_id,
        simulated=simulated,
        tolerance_pts=tolerance_pts,
        repetitions=tuple(reps),
        configs=tuple(configs),
        baseline_id=base.config_id if base else None,
        curves=tuple(curves),
        depths=depths,
        pareto=pareto,
        tables=(),
    )
    return replace(partial, tables=tuple(tables(partial)))


# ------------------------------------------------------------------------------------------ tables


def fmt(value: float | None, spec: str = ".4g", suffix: str = "") -> str:
    """A cell: the number, or an en dash when missing (missing is shown as missing, never 0)."""
    return "–" if value is None else f"{value:{spec}}{suffix}"


def fmt_spread(s: Spread | None, spec: str = ".4g") -> str:
    if s is None:
        return "–"
    if s.n < 2 or s.lo == s.hi:
        return f"{s.median:{spec}}"
    return f"{s.median:{spec}} [{s.lo:{spec}}–{s.hi:{spec}}]"


def _pct(s: Spread | None) -> Spread | None:
    return None if s is None else Spread(s.median * 100, s.lo * 100, s.hi * 100, s.n)


RESULT_HEADERS = ("Experts dropped", "Configuration", "Strategy", "Valid", "J/token", "ΔJ/token",
                  "Accuracy %", "ΔAcc (pts)", "EPI", "ΔEPI", "u(EPI)")

TARGET_TITLES = {"all": "All layers", "early": "Early layers only", "late": "Late layers only"}


def _valid_cell(c: ConfigSummary) -> str:
    """``valid/judged``; a configuration with nothing judged yet reads "–", not a failing 0/3."""
    judged = c.repetitions - c.pending
    if judged <= 0:
        return "–"
    return f"{c.valid}/{judged}"


def _result_row(c: ConfigSummary) -> tuple[str, ...]:
    return (
        str(c.experts),
        c.config_id,
        c.strategy or "–",
        _valid_cell(c),
        fmt_spread(c.jpt),
        fmt(c.jpt_change_pct, "+.1f", "%"),
        fmt_spread(_pct(c.accuracy), ".1f"),
        fmt(c.accuracy_change_pts, "+.2f"),
        fmt_spread(c.epi),
        fmt(c.epi_change_pct, "+.1f", "%"),
        fmt(c.epi_uncertainty_pct, ".1f", "%"),
    )


def tables(a: Analysis) -> list[Table]:
    """The paper's tables: one per layer target (baseline first), then the best-of summary."""
    out: list[Table] = []
    base = a.config(a.baseline_id) if a.baseline_id else None
    targets = [t for t in TARGETS if any(c.target == t and c.experts > 0 for c in a.configs)]
    for target in targets:
        rows = [c for c in a.configs if c.target == target and c.experts > 0]
        rows.sort(key=lambda c: c.experts)
        if base is not None:
            rows.insert(0, base)
        out.append(Table(
            title=TARGET_TITLES.get(target, target),
            headers=RESULT_HEADERS,
            rows=tuple(_result_row(c) for c in rows),
            note="Medians over valid repetitions [min–max]; Δ vs baseline medians; u(EPI): relative standard "
                 "uncertainty of one repetition (meter and accuracy).",
        ))
    # Configurations on no curve (a plan of unmodified models, or extra ones beside a pruning matrix).
    in_tables = {c.config_id for c in a.configs if c.target in targets and c.experts > 0}
    if targets and base is not None:
        in_tables.add(base.config_id)
    others = [c for c in a.configs if c.config_id not in in_tables]
    if others:
        out.append(Table(title="Other configurations" if targets else "All configurations",
                         headers=RESULT_HEADERS, rows=tuple(_result_row(c) for c in others),
                         note="Medians over valid repetitions [min–max]; Δ vs baseline medians."))
    best_rows: list[tuple[str, ...]] = []
    by_target = {d.target: d for d in a.depths}
    for target in targets:
        d = by_target.get(target)
        if d is None or d.epi_optimal_id is None:
            continue
        c = a.config(d.epi_optimal_id)
        best_rows.append((
            TARGET_TITLES.get(target, target),
            c.config_id,
            fmt(d.epi_optimal_value),
            fmt(c.epi_change_pct, "+.1f", "%"),
            fmt(c.accuracy_change_pts, "+.2f"),
            str(d.epi_optimal),
            "–" if d.accuracy_optimal is None else str(d.accuracy_optimal),
        ))
    ranked = [c for c in a.configs if c.epi is not None]
    if ranked:
        c = min(ranked, key=lambda c: c.epi.median)  # type: ignore[union-attr]
        best_rows.append((
            "Overall", c.config_id, fmt(c.epi.median if c.epi else None),
            fmt(c.epi_change_pct, "+.1f", "%"), fmt(c.accuracy_change_pts, "+.2f"),
            str(c.experts), "–",
        ))
    if best_rows:
        out.append(Table(
            title="Best of",
            headers=("Target", "Best configuration", "EPI", "ΔEPI", "ΔAcc (pts)", "EPI-optimal depth",
                     "Accuracy-optimal depth"),
            rows=tuple(best_rows),
            note=f"Accuracy-optimal: the deepest prune whose accuracy stays within {a.tolerance_pts:g} "
                 "point(s) of the baseline.",
        ))
    return out


def decomposition_table(a: Analysis) -> Table:
    """Energy-per-token change vs baseline split into power and time (log-decomposition)."""
    rows = []
    for c in a.configs:
        d = c.decomposition
        if d is None:
            continue
        rows.append((
            c.config_id,
            fmt(c.jpt_change_pct, "+.2f", "%"),
            fmt(d.d_ln_energy * 100, "+.2f"),
            fmt(d.d_ln_power * 100, "+.2f"),
            fmt(d.d_ln_time * 100, "+.2f"),
        ))
    return Table(
        title="Energy decomposition vs baseline",
        headers=("Configuration", "ΔJ/token", "100·ΔlnE", "100·ΔlnP̄", "100·Δln t"),
        rows=tuple(rows),
        note="ΔlnE = ΔlnP̄ + Δln t, per token: E joules per token, P̄ mean cluster watts, t seconds per token "
             "(medians over valid repetitions).",
    )


def pareto_table(a: Analysis) -> Table:
    rows = []
    for cid in a.pareto:
        c = a.config(cid)
        rows.append((cid, fmt(c.jpt.median if c.jpt else None), fmt(c.accuracy.median * 100 if c.accuracy else None, ".1f"),
                     fmt(c.epi.median if c.epi else None)))
    return Table(title="Pareto set (J/token vs accuracy)", headers=("Configuration", "J/token", "Accuracy %", "EPI"),
                 rows=tuple(rows), note="No other configuration uses fewer J/token at equal or higher accuracy.")


def task_table(a: Analysis) -> Table:
    """Median accuracy per benchmark task and configuration (valid repetitions), in percent."""
    names: list[str] = []
    for c in a.configs:
        names += [n for n, _ in c.tasks if n not in names]
    rows = []
    for c in a.configs:
        acc = dict(c.tasks)
        rows.append((c.config_id, *(fmt(acc[n] * 100 if n in acc else None, ".1f") for n in names),
                     fmt(c.accuracy.median * 100 if c.accuracy else None, ".1f")))
    return Table(title="Accuracy by task (%)", headers=("Configuration", *names, "Composite"), rows=tuple(rows),
                 note="Medians over valid repetitions; the composite weights tasks as configured.")
