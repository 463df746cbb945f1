"""EPI math: energy over windows (counter and trapezoid), coverage and gaps, EPI and the analyses."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from epiconsole import epi
from epiconsole.epi import (
    change_pct,
    cluster_energy,
    composite_accuracy,
    composite_stderr,
    decompose_energy,
    epi_relative_uncertainty,
    joules_per_token,
    optimal_depths,
    pareto_front,
    summarize,
    window_energy,
)
from epiconsole.ledger import SampleBlock

FAST = settings(max_examples=60, deadline=None)

# ------------------------------------------------------------------------------- strategies


@st.composite
def sample_times(draw: st.DrawFn, max_n: int = 60) -> np.ndarray:
    """Increasing sample times with steps from 0.01 s to 3 s (some above a 1 s gap limit)."""
    steps = draw(st.lists(st.floats(0.01, 3.0), min_size=2, max_size=max_n))
    return 100.0 + np.cumsum(steps)


powers = st.floats(0.0, 50.0, allow_nan=False)


# ----------------------------------------------------------------------------- properties


@FAST
@given(
    p=st.floats(0.1, 50.0),
    dt=st.floats(0.01, 0.9),
    n=st.integers(5, 200),
    a=st.floats(0.0, 1.0),
    b=st.floats(0.0, 1.0),
    counters=st.booleans(),
)
def test_constant_power_integrates_to_p_times_t(p, dt, n, a, b, counters):
    t = 1000.0 + np.arange(n) * dt
    W = np.full(n, p)
    Wh = (t - t[0]) * p / 3600.0 + 12.5 if counters else None
    lo, hi = sorted((a, b))
    t0 = t[0] + lo * (t[-1] - t[0])
    t1 = t[0] + hi * (t[-1] - t[0])
    assume(t1 - t0 > 1e-6)
    e = window_energy(t, W, Wh, t0, t1, gap_limit_s=1.0)
    assert e.method == ("counter" if counters else "trapezoid")
    assert e.joules == pytest.approx(p * (t1 - t0), rel=1e-9, abs=1e-9)
    assert e.coverage == pytest.approx(1.0)
    assert e.complete
    assert e.mean_watts == pytest.approx(p, rel=1e-6)
    assert e.longest_gap_s <= dt + 1e-9


@FAST
@given(t=sample_times(), data=st.data(), f1=st.floats(0, 1), f2=st.floats(0, 1), f3=st.floats(0, 1))
def test_windows_add_up(t, data, f1, f2, f3):
    W = np.array(data.draw(st.lists(powers, min_size=len(t), max_size=len(t))))
    span = t[-1] - t[0] + 4.0
    t0, tm, t2 = sorted(t[0] - 2.0 + f * span for f in (f1, f2, f3))
    assume(tm - t0 > 1e-3 and t2 - tm > 1e-3)
    whole = window_energy(t, W, None, t0, t2, 1.0)
    left = window_energy(t, W, None, t0, tm, 1.0)
    right = window_energy(t, W, None, tm, t2, 1.0)
    total = (left.joules or 0.0) + (right.joules or 0.0)
    assert (whole.joules or 0.0) == pytest.approx(total, rel=1e-9, abs=1e-6)
    covered = left.coverage * (tm - t0) + right.coverage * (t2 - tm)
    assert whole.coverage * (t2 - t0) == pytest.approx(covered, rel=1e-9, abs=1e-9)
    assert whole.longest_gap_s >= max(left.longest_gap_s, right.longest_gap_s) - 1e-9


@FAST
@given(t=sample_times(), data=st.data(), f1=st.floats(0, 1), f2=st.floats(0, 1))
def test_counter_windows_add_up(t, data, f1, f2):
    steps = data.draw(st.lists(st.floats(0.0, 0.01), min_size=len(t), max_size=len(t)))
    Wh = 3.0 + np.cumsum(steps)
    W = np.full(len(t), 5.0)
    ta, tb = sorted(t[0] + f * (t[-1] - t[0]) for f in (f1, f2))
    tm = (ta + tb) / 2
    assume(tb - ta > 1e-3)
    whole = window_energy(t, W, Wh, ta, tb, 5.0)
    left = window_energy(t, W, Wh, ta, tm, 5.0)
    right = window_energy(t, W, Wh, tm, tb, 5.0)
    assert whole.method == left.method == right.method == "counter"
    assert whole.joules == pytest.approx(left.joules + right.joules, rel=1e-9, abs=1e-9)


@FAST
@given(
    p_left=st.floats(1.0, 20.0),
    p_right=st.floats(1.0, 20.0),
    gap=st.floats(1.01, 30.0),
    n=st.integers(3, 50),
)
def test_gaps_are_never_bridged(p_left, p_right, gap, n):
    dt = 0.1
    left = 10.0 + np.arange(n) * dt
    right = left[-1] + gap + np.arange(n) * dt
    t = np.concatenate([left, right])
    W = np.concatenate([np.full(n, p_left), np.full(n, p_right)])
    t0, t1 = t[0], t[-1]
    e = window_energy(t, W, None, t0, t1, gap_limit_s=1.0)
    covered = 2 * (n - 1) * dt
    assert e.joules == pytest.approx(p_left * (n - 1) * dt + p_right * (n - 1) * dt, rel=1e-9)
    assert e.coverage == pytest.approx(covered / (t1 - t0), rel=1e-9)
    assert not e.complete
    assert e.longest_gap_s == pytest.approx(gap)
    # Missing values are gaps too, never zeros: a NaN run longer than the limit leaves the same hole.
    t2 = np.concatenate([left, left[-1] + dt * np.arange(1, int(gap / dt)), right])
    W2 = np.concatenate([np.full(n, p_left), np.full(len(t2) - 2 * n, np.nan), np.full(n, p_right)])
    e2 = window_energy(t2, W2, None, t0, t1, gap_limit_s=1.0)
    assert e2.joules == pytest.approx(e.joules, rel=1e-9)
    assert e2.coverage == pytest.approx(e.coverage, rel=1e-9)


@FAST
@given(
    j=st.floats(1e-3, 1e3),
    more=st.floats(1.0001, 100.0),
    acc=st.floats(0.01, 0.999),
    better=st.floats(0.0001, 1.0),
)
def test_epi_grows_with_energy_and_falls_with_accuracy(j, more, acc, better):
    tokens = 1000
    low = epi.epi(joules_per_token(j, tokens), acc)
    assert epi.epi(joules_per_token(j * more, tokens), acc) > low
    # A higher accuracy drawn inside (acc, 1] directly: filtering acc * k <= 1 rejected too many draws.
    higher = acc + better * (1.0 - acc)
    assume(higher > acc)
    assert epi.epi(joules_per_token(j, tokens), higher) < low


@FAST
@given(
    st.lists(
        st.tuples(st.one_of(st.none(), st.floats(0.01, 10.0)), st.one_of(st.none(), st.floats(0.0, 1.0))),
        max_size=40,
    )
)
def test_every_pareto_point_is_non_dominated(points):
    front = pareto_front(points)
    valid = [i for i, (x, y) in enumerate(points) if x is not None and y is not None]

    def dominates(a, b):
        (xa, ya), (xb, yb) = points[a], points[b]
        return xa <= xb and ya >= yb and (xa < xb or ya > yb)

    assert set(front) <= set(valid)
    for i in front:
        assert not any(dominates(j, i) for j in valid)
    for i in set(valid) - set(front):
        assert any(dominates(j, i) for j in front)
    xs = [points[i][0] for i in front]
    assert xs == sorted(xs)


# ---------------------------------------------------------------------------- energy cases


def _trace(n=101, dt=0.1, p=10.0, t_start=0.0):
    t = t_start + np.arange(n) * dt
    return t, np.full(n, p), 5.0 + (t - t_start) * p / 3600.0


def test_counter_is_exact_across_lost_lines():
    t, W, Wh = _trace(n=201)
    keep = np.ones(t.size, dtype=bool)
    keep[50:120] = False  # 7 s of lost lines: trapezoid would leave a hole, the board kept counting
    e = window_energy(t[keep], W[keep], Wh[keep], 1.0, 19.0, gap_limit_s=1.0)
    assert e.method == "counter"
    assert e.joules == pytest.approx(10.0 * 18.0)
    assert e.coverage < 0.7 and e.longest_gap_s == pytest.approx(7.1)


def test_reboot_falls_back_to_trapezoid():
    t, W, Wh = _trace()
    Wh[60:] -= Wh[60] - 0.0001  # counter restarted near zero
    e = window_energy(t, W, Wh, 1.0, 9.0, gap_limit_s=1.0)
    assert e.method == "trapezoid"
    assert e.joules == pytest.approx(80.0)


def test_uncovered_window_end_is_not_counter_and_reports_coverage():
    t, W, Wh = _trace()  # samples 0..10 s
    e = window_energy(t, W, Wh, 5.0, 12.0, gap_limit_s=1.0)
    assert e.method == "trapezoid"
    assert e.joules == pytest.approx(50.0)
    assert e.coverage == pytest.approx(5.0 / 7.0)
    assert e.longest_gap_s == pytest.approx(2.0)


def test_a_gap_that_ends_exactly_at_the_window_start_is_not_a_gap_of_the_window():
    t = np.concatenate([[0.0], 10.0 + np.arange(51) * 0.1])  # 10 s of silence, then samples from t0 on
    W = np.full(t.size, 4.0)
    e = window_energy(t, W, None, 10.0, 15.0, gap_limit_s=1.0)
    assert e.complete and e.longest_gap_s == pytest.approx(0.1)
    e = window_energy(t, W, None, 9.0, 15.0, gap_limit_s=1.0)  # now the silence is inside the window
    assert not e.complete and e.longest_gap_s == pytest.approx(10.0)


def test_no_samples_is_none_not_zero():
    e = window_energy(np.array([]), np.array([]), None, 0.0, 10.0, 1.0)
    assert e.joules is None and e.method is None and e.coverage == 0.0 and e.longest_gap_s == 10.0
    t = np.array([0.0, 5.0, 10.0])
    e = window_energy(t, np.array([1.0, np.nan, 1.0]), None, 0.0, 10.0, 1.0)
    assert e.joules is None and e.mean_watts is None
    e = window_energy(t, np.array([1.0, 1.0, 1.0]), None, 0.0, 10.0, 1.0)
    assert e.joules is None and e.n_samples == 3 and e.peak_watts == 1.0


def test_unsorted_samples_and_bad_arguments():
    t, W, _ = _trace()
    order = np.random.default_rng(0).permutation(t.size)
    assert window_energy(t[order], W[order], None, 1, 9, 1.0).joules == pytest.approx(80.0)
    with pytest.raises(ValueError):
        window_energy(t, W, None, 5.0, 5.0, 1.0)
    with pytest.raises(ValueError):
        window_energy(t, W, None, 1.0, 5.0, 0.0)
    with pytest.raises(ValueError):
        window_energy(t, W[:-1], None, 1.0, 5.0, 1.0)


def test_trapezoid_interpolates_at_the_window_ends():
    t = np.array([0.0, 1.0, 2.0])
    W = np.array([0.0, 10.0, 0.0])
    e = window_energy(t, W, None, 0.5, 1.5, 1.0)
    assert e.joules == pytest.approx(7.5)  # two trapezoids 0.5 * (5 + 10) / 2
    assert e.peak_watts == 10.0 and e.n_samples == 1


def test_cluster_energy_sums_nodes_and_propagates_missing():
    n = 101
    t = np.arange(n) * 0.1
    W = np.stack([np.full(n, 3.0), np.full(n, 10.0), np.full(n, 11.0), np.full(n, 12.0)], axis=1)
    Wh = 1.0 + np.cumsum(W * 0.1 / 3600.0, axis=0) - W * 0.1 / 3600.0
    block = SampleBlock.from_arrays(t, W=W, Wh=Wh)
    names = {"0": "pi0", "1": "pi1", "2": "pi2", "3": "pi3"}
    c = cluster_energy(block, 1.0, 9.0, 1.0, names)
    assert list(c.nodes) == ["pi0", "pi1", "pi2", "pi3"]
    assert c.method == "counter" and c.complete
    assert c.joules == pytest.approx(36.0 * 8.0)
    assert c.mean_watts == pytest.approx(36.0)
    assert c.peak_watts == pytest.approx(36.0)
    W2 = W.copy()
    W2[:, 3] = np.nan
    Wh2 = Wh.copy()
    Wh2[:, 3] = np.nan
    c2 = cluster_energy(SampleBlock.from_arrays(t, W=W2, Wh=Wh2), 1.0, 9.0, 1.0, names)
    assert c2.joules is None and c2.nodes["pi3"].joules is None and c2.coverage == 0.0
    assert c2.nodes["pi0"].joules == pytest.approx(24.0)
    # Without a channel map, every channel counts, named by its index.
    assert set(cluster_energy(block, 1.0, 9.0, 1.0).nodes) == {"ch0", "ch1", "ch2", "ch3"}


def test_cluster_energy_mixed_methods():
    n = 101
    t = np.arange(n) * 0.1
    W = np.full((n, 2), 5.0)
    Wh = np.stack([t * 5 / 3600, np.full(n, np.nan)], axis=1)
    c = cluster_energy(SampleBlock.from_arrays(t, W=W, Wh=Wh), 1.0, 9.0, 1.0, {0: "a", 1: "b"})
    assert c.method == "mixed" and c.joules == pytest.approx(80.0)


# ----------------------------------------------------------------------------- small figures


def test_joules_per_token_and_epi_none_propagation():
    assert joules_per_token(100.0, 50) == 2.0
    assert joules_per_token(None, 50) is None
    assert joules_per_token(100.0, 0) is None
    assert joules_per_token(float("nan"), 5) is None
    assert epi.epi(2.0, 0.5) == 4.0
    assert epi.epi(2.0, 0.0) is None
    assert epi.epi(None, 0.5) is None


def test_composite_accuracy_and_stderr():
    accs = {"mmlu": 0.7, "arc_challenge": 0.5, "hellaswag": 0.6}
    assert composite_accuracy(accs) == pytest.approx(0.6)
    assert composite_accuracy(accs, {"mmlu": 2, "arc_challenge": 1, "hellaswag": 1}) == pytest.approx(0.625)
    assert composite_accuracy({**accs, "hellaswag": None}) is None
    assert composite_accuracy({}) is None
    with pytest.raises(ValueError):
        composite_accuracy({"a": 1.5})
    with pytest.raises(ValueError):
        composite_accuracy(accs, {"mmlu": 1})
    with pytest.raises(ValueError):
        composite_accuracy(accs, {"mmlu": 0, "arc_challenge": 0, "hellaswag": 0})
    se = composite_stderr({"a": 0.03, "b": 0.04})
    assert se == pytest.approx(0.025)
    assert epi.accuracy_stderr(0.5, 100) == pytest.approx(0.05)
    assert epi.accuracy_stderr(0.5, 0) is None


def test_summarize_and_change():
    s = summarize([3.0, None, 1.0, 2.0, float("nan")])
    assert (s.median, s.min, s.max, s.spread, s.n, s.n_missing) == (2.0, 1.0, 3.0, 2.0, 3, 2)
    assert s.spread_pct == pytest.approx(100.0)
    empty = summarize([None])
    assert empty.median is None and empty.n == 0 and empty.spread_pct is None
    assert change_pct(110.0, 100.0) == pytest.approx(10.0)
    assert change_pct(90.0, 100.0) == pytest.approx(-10.0)
    assert change_pct(1.0, 0.0) is None and change_pct(None, 1.0) is None


def _matrix():
    rows = [{"config_id": "baseline", "experts": 0, "target": None, "epi": 10.0, "accuracy": 0.700}]
    acc_all = [0.698, 0.695, 0.69, 0.66, 0.6]
    epi_all = [9.5, 9.0, 8.8, 9.1, 9.9]
    for k in range(1, 6):
        rows.append(
            {
                "config_id": f"drop{k}_all",
                "experts": k,
                "target": "all",
                "epi": epi_all[k - 1],
                "accuracy": acc_all[k - 1],
            }
        )
        rows.append(
            {"config_id": f"drop{k}_late", "experts": k, "target": "late", "epi": 10.5, "accuracy": 0.5}
        )
    return rows


def test_optimal_depths():
    out = optimal_depths(_matrix(), tolerance_pts=1.0)
    assert set(out) == {"all", "late"}
    assert (out["all"].epi_optimal, out["all"].epi_optimal_config) == (3, "drop3_all")
    assert (out["all"].accuracy_optimal, out["all"].accuracy_optimal_config) == (3, "drop3_all")
    assert out["late"].epi_optimal == 0 and out["late"].epi_optimal_config == "baseline"
    assert out["late"].accuracy_optimal == 0
    assert optimal_depths(_matrix(), tolerance_pts=0.25)["all"].accuracy_optimal == 1
    assert optimal_depths(_matrix(), tolerance_pts=0.1)["all"].accuracy_optimal == 0
    # Missing figures are left out, never read as 0.
    rows = _matrix()
    rows[0]["accuracy"] = None
    assert optimal_depths(rows)["all"].accuracy_optimal is None


def test_decompose_energy_and_uncertainty():
    d = decompose_energy(120.0, 12.0, 100.0, 10.0)
    assert d is not None
    assert d.dlnE == pytest.approx(math.log(1.2))
    assert d.dlnt == pytest.approx(math.log(1.2))
    assert d.dlnP == pytest.approx(0.0, abs=1e-12)
    assert d.dlnE == pytest.approx(d.dlnP + d.dlnt)
    assert d.power_share == pytest.approx(0.0, abs=1e-12)
    assert decompose_energy(1.0, 0.0, 1.0, 1.0) is None
    assert decompose_energy(None, 1.0, 1.0, 1.0) is None
    assert epi_relative_uncertainty(1.0, 0.5, 0.01) == pytest.approx(math.hypot(0.01, 0.02))
    assert epi_relative_uncertainty(1.0, 0.0, 0.01) is None
    assert epi_relative_uncertainty(None, 0.5, 0.01) is None
