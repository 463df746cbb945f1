"""EPI math: energy over a window, J/token, composite accuracy, EPI and the analyses built on them.

Pure functions over numpy arrays and plain numbers: no I/O, no ledger. ``EPI = (E / N_tokens) / A``
(joules per token divided by accuracy in [0, 1]; lower is better).

Conventions: missing is ``None``, never 0, and every function propagates it (a figure computed from
a missing input is missing). Accuracies are fractions in [0, 1]; tolerances are in percentage points.

Energy over a window (:func:`window_energy`) follows the meter protocol. Samples are at host times
``t``; two consecutive samples at most ``gap_limit_s`` apart *cover* the time between them, a longer
gap is never bridged (the stretch counts as uncovered) and never read as zero.

- ``counter`` method, preferred: the cumulative ``Wh`` counter is read at both window ends, each by
  linear interpolation between the samples around it (which must cover that end), and the counter
  is non-decreasing over the window (no board reboot). This is exact even if lines were lost inside
  the window, because the board kept counting.
- ``trapezoid`` method, otherwise: trapezoidal integration of ``W`` over the covered parts of the
  window only (with linear interpolation at the window ends). When coverage is incomplete the
  figure is the energy of the covered parts, a lower bound: check ``coverage`` (or ``complete``);
  the engine marks such a repetition invalid.

``coverage`` (covered fraction of the window) and ``longest_gap_s`` (the longest time between
consecutive samples touching the window; a window end with no sample beyond it counts as a gap up to
that end) are returned beside every energy figure.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np

# ------------------------------------------------------------------------------------ energy


@dataclass(frozen=True)
class WindowEnergy:
    """Energy of one channel over a window, with how well the samples covered it."""

    joules: float | None
    method: str | None  # "counter", "trapezoid", or None when no energy could be computed
    coverage: float  # covered fraction of the window, 0..1
    longest_gap_s: float
    n_samples: int  # valid samples inside the window
    mean_watts: float | None
    peak_watts: float | None
    duration_s: float

    @property
    def complete(self) -> bool:
        """True when the figure covers the whole window (coverage 1, no unbridged gap)."""
        return self.joules is not None and self.coverage >= 1.0 - 1e-9


@dataclass(frozen=True)
class ClusterEnergy:
    """Energy of every node over a window and the cluster totals (None if any node's is missing)."""

    nodes: dict[str, WindowEnergy]
    joules: float | None
    method: str | None  # "counter", "trapezoid", "mixed" or None
    coverage: float  # the worst node's
    longest_gap_s: float  # the worst node's
    mean_watts: float | None
    peak_watts: float | None  # peak of the summed power of all nodes at one tick
    duration_s: float

    @property
    def complete(self) -> bool:
        return self.joules is not None and all(n.complete for n in self.nodes.values())


class _Samples(Protocol):
    """What :func:`cluster_energy` needs from a block of samples (e.g. ``ledger.SampleBlock``)."""

    t: np.ndarray
    W: np.ndarray
    Wh: np.ndarray


def _coverage(ts: np.ndarray, t0: float, t1: float, gap_limit_s: float) -> tuple[float, float, np.ndarray]:
    """(covered seconds, longest gap, covered-interval mask) for sorted valid sample times ``ts``."""
    if ts.size == 0:
        return 0.0, t1 - t0, np.zeros(0, dtype=bool)
    dt = np.diff(ts)
    a = np.maximum(ts[:-1], t0)
    b = np.minimum(ts[1:], t1)
    overlap = np.clip(b - a, 0.0, None)
    covered = dt <= gap_limit_s
    covered_s = float(overlap[covered].sum())
    # Strictly inside: an interval that only meets the window at an end (a sample exactly at t0
    # after a long silence) leaves nothing of the window uncovered, so its length is no gap of it.
    touching = (ts[1:] > t0) & (ts[:-1] < t1)
    longest = float(dt[touching].max()) if touching.any() else 0.0
    # A window end with no sample beyond it is uncovered up to that end.
    if ts[0] > t0:
        longest = max(longest, min(ts[0], t1) - t0)
    if ts[-1] < t1:
        longest = max(longest, t1 - max(ts[-1], t0))
    return covered_s, longest, covered


def _trapezoid(ts: np.ndarray, w: np.ndarray, t0: float, t1: float, covered: np.ndarray) -> float:
    """Trapezoidal energy (J) over the covered intervals, clipped to [t0, t1]."""
    if ts.size < 2:
        return 0.0
    dt = np.diff(ts)
    a = np.maximum(ts[:-1], t0)
    b = np.minimum(ts[1:], t1)
    use = covered & (b > a)
    if not use.any():
        return 0.0
    ta, dt_u = ts[:-1][use], dt[use]
    wa0, wb0 = w[:-1][use], w[1:][use]
    slope = (wb0 - wa0) / dt_u  # dt_u > 0 because b > a
    au, bu = a[use], b[use]
    wa = wa0 + slope * (au - ta)
    wb = wa0 + slope * (bu - ta)
    return float(np.sum((bu - au) * (wa + wb)) * 0.5)


def _counter_at(te: np.ndarray, e: np.ndarray, t: float, gap_limit_s: float) -> tuple[float, int, int] | None:
    """Counter value at ``t`` interpolated between the samples around it, with their indices."""
    j = int(np.searchsorted(te, t, side="left"))  # first sample >= t
    if j < te.size and te[j] == t:
        return float(e[j]), j, j
    i = j - 1
    if i < 0 or j >= te.size or te[j] - te[i] > gap_limit_s:
        return None
    frac = (t - te[i]) / (te[j] - te[i])
    return float(e[i] + (e[j] - e[i]) * frac), i, j


def _valid(ts: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The samples where both time and value are present (no copy when all are)."""
    ok = np.isfinite(v)
    ok &= np.isfinite(ts)
    return (ts, v) if ok.all() else (ts[ok], v[ok])


def _near(ts: np.ndarray, v: np.ndarray, t0: float, t1: float) -> tuple[np.ndarray, np.ndarray]:
    """The valid samples that can touch [t0, t1]: those inside and the nearest one on each side."""
    lo = max(int(np.searchsorted(ts, t0, side="left")) - 1, 0)
    hi = int(np.searchsorted(ts, t1, side="right")) + 1
    return ts[lo:hi], v[lo:hi]


def window_energy(t: Any, W: Any, Wh: Any | None, t0: float, t1: float, gap_limit_s: float) -> WindowEnergy:
    """Energy of one channel over [t0, t1] from samples ``t`` (s), ``W`` (watts), ``Wh`` (cumulative).

    NaN marks a missing value. Pass samples reaching at least ``gap_limit_s`` beyond both window
    ends, so the ends can be covered. See the module doc for the methods and the coverage figures.
    """
    if not t1 > t0:
        raise ValueError(f"the window must end after it starts ({t0} .. {t1})")
    if not gap_limit_s > 0:
        raise ValueError("gap_limit_s must be positive")
    tt = np.asarray(t, dtype=np.float64)
    ww = np.asarray(W, dtype=np.float64)
    ee = None if Wh is None else np.asarray(Wh, dtype=np.float64)
    if not (tt.shape == ww.shape == (tt.shape if ee is None else ee.shape)) or tt.ndim != 1:
        raise ValueError("t, W and Wh must be 1-D arrays of the same length")
    if tt.size > 1 and not bool(np.all(tt[1:] >= tt[:-1])):
        order = np.argsort(tt, kind="stable")
        tt, ww = tt[order], ww[order]
        ee = None if ee is None else ee[order]
    duration = t1 - t0

    tw, w = _near(*_valid(tt, ww), t0, t1)
    inside = (tw >= t0) & (tw <= t1)
    n_samples = int(inside.sum())
    peak = float(w[inside].max()) if n_samples else None

    # Counter method: both ends covered, counter monotonic in between.
    te, e = _near(*_valid(tt, ee), t0, t1) if ee is not None else (tt[:0], tt[:0])
    start = _counter_at(te, e, t0, gap_limit_s) if te.size else None
    end = _counter_at(te, e, t1, gap_limit_s) if start else None
    if start and end and bool(np.all(np.diff(e[start[1] : end[2] + 1]) >= 0)):
        joules = (end[0] - start[0]) * 3600.0
        covered_s, longest, _ = _coverage(te, t0, t1, gap_limit_s)
        return WindowEnergy(
            joules=joules,
            method="counter",
            coverage=min(covered_s / duration, 1.0),
            longest_gap_s=longest,
            n_samples=int(((te >= t0) & (te <= t1)).sum()),
            mean_watts=joules / duration,
            peak_watts=peak,
            duration_s=duration,
        )

    covered_s, longest, covered = _coverage(tw, t0, t1, gap_limit_s)
    if covered_s <= 0.0:
        return WindowEnergy(None, None, 0.0, longest, n_samples, None, peak, duration)
    joules = _trapezoid(tw, w, t0, t1, covered)
    return WindowEnergy(
        joules=joules,
        method="trapezoid",
        coverage=min(covered_s / duration, 1.0),
        longest_gap_s=longest,
        n_samples=n_samples,
        mean_watts=joules / covered_s,
        peak_watts=peak,
        duration_s=duration,
    )


def cluster_energy(
    block: _Samples,
    t0: float,
    t1: float,
    gap_limit_s: float,
    channels: Mapping[int | str, str] | None = None,
) -> ClusterEnergy:
    """Energy per node over [t0, t1] and the cluster total.

    ``channels`` maps meter channel (int, or its string as in the lab config) to node name; by
    default every channel of the block, named ``ch0``, ``ch1``, ...
    """
    t = np.asarray(block.t, dtype=np.float64)
    Wa = np.asarray(block.W, dtype=np.float64)
    Wha = np.asarray(block.Wh, dtype=np.float64)
    if channels is None:
        channels = {c: f"ch{c}" for c in range(Wa.shape[1] if Wa.ndim == 2 else 0)}
    chans = {int(c): node for c, node in channels.items()}
    if t.size > 1 and not bool(np.all(t[1:] >= t[:-1])):
        order = np.argsort(t, kind="stable")
        t, Wa, Wha = t[order], Wa[order], Wha[order]
    nodes = {node: window_energy(t, Wa[:, c], Wha[:, c], t0, t1, gap_limit_s) for c, node in chans.items()}
    duration = t1 - t0
    figures = list(nodes.values())
    joules = None if not figures or any(f.joules is None for f in figures) else sum(f.joules for f in figures)  # type: ignore[misc]
    methods = {f.method for f in figures}
    method = None if joules is None else (methods.pop() if len(methods) == 1 else "mixed")
    i0, i1 = int(np.searchsorted(t, t0, "left")), int(np.searchsorted(t, t1, "right"))
    peak = None
    if chans and i1 > i0:
        cols = list(chans)
        inside = Wa[i0:i1] if cols == list(range(Wa.shape[1])) else Wa[i0:i1, cols]
        total = inside.sum(axis=1)  # NaN where any node is missing at that tick
        total = total[np.isfinite(total)]
        peak = float(total.max()) if total.size else None
    return ClusterEnergy(
        nodes=nodes,
        joules=joules,
        method=method,
        coverage=min((f.coverage for f in figures), default=0.0),
        longest_gap_s=max((f.longest_gap_s for f in figures), default=duration),
        mean_watts=None if joules is None else joules / duration,
        peak_watts=peak,
        duration_s=duration,
    )


# ------------------------------------------------------------------------- per-token and EPI


def _num(x: Any) -> float | None:
    """x as a finite float, or None when missing (None or NaN)."""
    if x is None:
        return None
    f = float(x)
    return f if math.isfinite(f) else None


def joules_per_token(joules: float | None, tokens: int | None) -> float | None:
    """Energy per token; None when either is missing or no tokens were counted."""
    j, n = _num(joules), _num(tokens)
    if j is None or n is None or n <= 0:
        return None
    return j / n


def _weights(names: Iterable[str], weights: Mapping[str, float] | None) -> dict[str, float]:
    names = list(names)
    if weights is None:
        return dict.fromkeys(names, 1.0)
    missing = [n for n in names if n not in weights]
    if missing:
        raise ValueError(f"no weight for {missing}")
    w = {n: float(weights[n]) for n in names}
    if any(v < 0 or not math.isfinite(v) for v in w.values()) or sum(w.values()) <= 0:
        raise ValueError("weights must be finite, non-negative and not all zero")
    return w


def _all_present(values: Mapping[str, float | None]) -> dict[str, float] | None:
    """``values`` as finite floats, or None when it is empty or any value is missing."""
    out = {k: _num(v) for k, v in values.items()}
    if not out or any(v is None for v in out.values()):
        return None
    return out  # type: ignore[return-value]


def composite_accuracy(
    accs: Mapping[str, float | None], weights: Mapping[str, float] | None = None
) -> float | None:
    """Weighted mean of task accuracies (equal weights by default); None if any task is missing."""
    values = _all_present(accs)
    if values is None:
        return None
    for k, v in values.items():
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"accuracy of {k} must be in [0, 1], not {v}")
    w = _weights(values, weights)
    return sum(w[k] * values[k] for k in values) / sum(w.values())


def composite_stderr(
    stderrs: Mapping[str, float | None], weights: Mapping[str, float] | None = None
) -> float | None:
    """Standard error of :func:`composite_accuracy`, tasks taken as independent."""
    values = _all_present(stderrs)
    if values is None:
        return None
    w = _weights(values, weights)
    return math.sqrt(sum((w[k] * values[k]) ** 2 for k in values)) / sum(w.values())


def accuracy_stderr(accuracy: float | None, n_items: int | None) -> float | None:
    """Binomial standard error of an accuracy measured on ``n_items`` items."""
    a, n = _num(accuracy), _num(n_items)
    if a is None or n is None or n <= 0:
        return None
    return math.sqrt(max(a * (1.0 - a), 0.0) / n)


def epi(jpt: float | None, accuracy: float | None) -> float | None:
    """EPI = (J/token) / accuracy; None when either is missing or accuracy is 0."""
    j, a = _num(jpt), _num(accuracy)
    if j is None or a is None or a <= 0:
        return None
    return j / a


def epi_relative_uncertainty(
    meter_pct: float | None, accuracy: float | None, accuracy_stderr: float | None
) -> float | None:
    """Relative (fractional) standard uncertainty of an EPI figure.

    Energy carries the meter's stated uncertainty (percent), the token count is exact, and the
    accuracy's relative standard error adds in quadrature: ``sqrt((m/100)^2 + (se/A)^2)``.
    """
    m, a, se = _num(meter_pct), _num(accuracy), _num(accuracy_stderr)
    if m is None or a is None or se is None or a <= 0 or m < 0 or se < 0:
        return None
    return math.hypot(m / 100.0, se / a)


# --------------------------------------------------------------------- repetitions, baseline


@dataclass(frozen=True)
class Summary:
    """Median and spread of repetitions (missing values are counted, not used)."""

    median: float | None
    min: float | None
    max: float | None
    spread: float | None  # max - min
    n: int  # values used
    n_missing: int = 0

    @property
    def spread_pct(self) -> float | None:
        """Spread relative to the median, in percent."""
        if self.spread is None or not self.median:
            return None
        return self.spread / abs(self.median) * 100.0


def summarize(values: Iterable[float | None]) -> Summary:
    """Median, min, max and spread of the present values."""
    raw = list(values)
    present = [v for v in (_num(x) for x in raw) if v is not None]
    missing = len(raw) - len(present)
    if not present:
        return Summary(None, None, None, None, 0, missing)
    lo, hi = min(present), max(present)
    return Summary(float(np.median(present)), lo, hi, hi - lo, len(present), missing)


def change_pct(value: float | None, baseline: float | None) -> float | None:
    """Change of ``value`` relative to ``baseline`` in percent; None if missing or baseline is 0."""
    v, b = _num(value), _num(baseline)
    if v is None or b is None or b == 0:
        return None
    return (v - b) / abs(b) * 100.0


# ---------------------------------------------------------------------------------- analysis


@dataclass(frozen=True)
class OptimalDepth:
    """For one layer target: the EPI-optimal and the accuracy-optimal prune depth (experts dropped)."""

    target: str
    epi_optimal: int | None
    epi_optimal_config: str | None
    accuracy_optimal: int | None
    accuracy_optimal_config: str | None


def _get(row: Any, key: str) -> Any:
    return row.get(key) if isinstance(row, Mapping) else getattr(row, key, None)


def optimal_depths(results: Iterable[Any], tolerance_pts: float = 1.0) -> dict[str, OptimalDepth]:
    """EPI-optimal and accuracy-optimal depth per layer target.

    ``results`` are per-configuration figures (mappings or objects) with ``config_id``, ``experts``
    (experts dropped), ``target`` (``None`` for the baseline, which is depth 0 of every target's
    curve), ``epi`` and ``accuracy`` (typically medians over repetitions). EPI-optimal: the lowest
    EPI (ties go to the shallower prune). Accuracy-optimal: the deepest prune whose accuracy is
    within ``tolerance_pts`` percentage points of the baseline's.
    """
    rows = list(results)
    baseline = next((r for r in rows if _get(r, "target") is None), None)
    base_acc = _num(_get(baseline, "accuracy")) if baseline is not None else None
    targets = sorted({str(_get(r, "target")) for r in rows if _get(r, "target") is not None})
    out: dict[str, OptimalDepth] = {}
    for target in targets:
        curve = [r for r in rows if _get(r, "target") == target]
        if baseline is not None:
            curve.append(baseline)

        def depth(r: Any) -> int:
            return int(_get(r, "experts") or 0) if _get(r, "target") is not None else 0

        with_epi = [r for r in curve if _num(_get(r, "epi")) is not None]
        best = min(with_epi, key=lambda r: (_num(_get(r, "epi")), depth(r)), default=None)
        acc_best = None
        if base_acc is not None:
            floor = base_acc - tolerance_pts / 100.0 - 1e-12
            within = [r for r in curve if (a := _num(_get(r, "accuracy"))) is not None and a >= floor]
            acc_best = max(within, key=depth, default=None)
        out[target] = OptimalDepth(
            target=target,
            epi_optimal=None if best is None else depth(best),
            epi_optimal_config=None if best is None else str(_get(best, "config_id")),
            accuracy_optimal=None if acc_best is None else depth(acc_best),
            accuracy_optimal_config=None if acc_best is None else str(_get(acc_best, "config_id")),
        )
    return out


def pareto_front(points: Sequence[tuple[float | None, float | None]]) -> list[int]:
    """Indices of the non-dominated (J/token, accuracy) points, by increasing J/token.

    Lower J/token and higher accuracy are better; a point is dominated when another is at least as
    good in both and better in one. Points with a missing coordinate are left out; equal points are
    all kept.
    """
    valid = [
        (x, y, i)
        for i, (x0, y0) in enumerate(points)
        if (x := _num(x0)) is not None and (y := _num(y0)) is not None
    ]
    valid.sort(key=lambda p: (p[0], -p[1], p[2]))
    front: list[int] = []
    best_y = -math.inf
    last: tuple[float, float] | None = None
    for x, y, i in valid:
        if y > best_y or (last is not None and (x, y) == last):
            front.append(i)
            best_y, last = y, (x, y)
    return front


class EnergyDecomposition(NamedTuple):
    """Log-change of energy split into mean power and duration: ``dlnE = dlnP + dlnt``."""

    dlnE: float
    dlnP: float
    dlnt: float

    @property
    def power_share(self) -> float | None:
        """Fraction of the energy change due to mean power (None when energy did not change)."""
        return None if self.dlnE == 0 else self.dlnP / self.dlnE


def decompose_energy(
    E: float | None, t: float | None, E0: float | None, t0: float | None
) -> EnergyDecomposition | None:
    """Split the change from (E0 over t0) to (E over t) into power and time parts (natural logs)."""
    vals = [_num(v) for v in (E, t, E0, t0)]
    if any(v is None or v <= 0 for v in vals):
        return None
    e, tt, e0, tt0 = vals  # type: ignore[misc]
    dlnE = math.log(e / e0)
    dlnt = math.log(tt / tt0)
    return EnergyDecomposition(dlnE, dlnE - dlnt, dlnt)
