"""Analysis: per-configuration summaries, curves, optimal depths, Pareto set, decomposition, tables."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from epiconsole.analysis import analyze, repetitions
from epiconsole.ledger import Ledger
from tests.analysis_fixtures import build_campaign, paper_like_results, result

# ------------------------------------------------------------------------------------------ records


def test_repetition_reads_the_seed_schema_and_keeps_missing_as_none() -> None:
    r = repetitions([result("drop1_all", 1, experts=1, target="all", strategy="remove", joules=2000.0, tokens=500,
                            acc=0.8)])[0]
    assert r.joules == 2000.0 and r.tokens == 500 and r.jpt == pytest.approx(4.0)
    assert r.epi == pytest.approx(4.0 / 0.8) and r.accuracy == 0.8 and r.strategy == "remove"
    assert dict(r.tasks) == {"mmlu": 0.8, "arc_challenge": 0.8}  # composite and stderr are not tasks
    assert r.usable and r.window == (10.0, 110.0)
    missing = repetitions([result("x", 1, joules=None)])[0]
    assert missing.joules is None and missing.jpt is None and missing.epi is None and not missing.usable
    pending = repetitions([result("x", 2, status="pending", valid=None)])[0]
    assert pending.epi is None and not pending.usable


# ------------------------------------------------------------------------------------------ summaries


def test_summary_uses_valid_repetitions_only_but_counts_the_rest() -> None:
    res = [
        result("baseline", 1, joules=1000), result("baseline", 2, joules=1010), result("baseline", 3, joules=990),
        # an invalid repetition with an absurd figure must not move the median
        result("drop1_all", 1, experts=1, target="all", ord_=1, joules=900),
        result("drop1_all", 2, experts=1, target="all", ord_=1, joules=99999, valid=False, reasons=("gap of 3 s on pi2",)),
        result("drop1_all", 3, experts=1, target="all", ord_=1, joules=920),
        result("drop1_all", 4, experts=1, target="all", ord_=1, status="failed", valid=False, reasons=("deploy failed",)),
    ]
    a = analyze(res)
    c = a.config("drop1_all")
    assert (c.repetitions, c.valid, c.invalid, c.failed) == (4, 2, 1, 1)
    assert c.jpt is not None and c.jpt.median == pytest.approx(0.91) and c.jpt.hi == pytest.approx(0.92)
    assert c.invalid_reasons == ("gap of 3 s on pi2", "deploy failed")
    base = a.config("baseline")
    assert base.jpt is not None and base.jpt.median == pytest.approx(1.0)
    assert c.jpt_change_pct == pytest.approx(-9.0)
    assert c.epi_change_pct == pytest.approx(-9.0)  # same accuracy: EPI moves with J/token
    assert c.accuracy_change_pts == pytest.approx(0.0)
    assert base.jpt_change_pct is None  # the baseline is the reference
    assert a.counts == {"repetitions": 7, "valid": 5, "invalid": 1, "failed": 1, "pending": 0}


def test_configuration_without_valid_repetitions_has_no_figures() -> None:
    a = analyze([result("baseline", 1), result("drop1_all", 1, experts=1, target="all", ord_=1, valid=False,
                                                reasons=("throttled",))])
    c = a.config("drop1_all")
    assert c.epi is None and c.jpt is None and c.epi_change_pct is None
    table = a.tables[0]
    row = next(r for r in table.rows if r[1] == "drop1_all")
    assert row[3] == "0/1" and row[8] == "–"  # shown as missing, never as 0


# ------------------------------------------------------------------------------------------ curves, depths


def test_curves_start_at_the_baseline_and_follow_depth() -> None:
    a = analyze(paper_like_results())
    assert [c.target for c in a.curves] == ["all", "early", "late"]
    for curve in a.curves:
        xs = [p.experts for p in curve.points]
        assert xs == list(range(0, 9))
        assert curve.points[0].config_id == "baseline"


def test_epi_optimal_and_accuracy_optimal_depths() -> None:
    res = paper_like_results()
    a = analyze(res, tolerance_pts=1.0)
    d = {x.target: x for x in a.depths}
    # Independent expectation from the model: EPI(n) = 1.2 (1 - 0.012 n) / (0.76 - 0.0015 n^1.5).
    epi = {n: 1.2 * (1 - 0.012 * n) / (0.76 - 0.0015 * n**1.5) for n in range(0, 9)}
    assert d["all"].epi_optimal == min(epi, key=epi.__getitem__)
    assert d["all"].accuracy_optimal == 3  # 0.15 * 4^1.5 = 1.2 points > 1
    assert d["all"].tension
    assert d["early"].accuracy_optimal == 1  # 0.6 n <= 1
    assert d["late"].accuracy_optimal == 3  # 0.3 n <= 1
    wider = {x.target: x for x in analyze(res, tolerance_pts=2.0).depths}
    assert wider["all"].accuracy_optimal == 5 and wider["late"].accuracy_optimal == 6


def test_pareto_set_holds_exactly_the_non_dominated_configurations() -> None:
    a = analyze(paper_like_results())
    points = {c.config_id: (c.jpt.median, c.accuracy.median) for c in a.configs if c.jpt and c.accuracy}
    expected = {
        cid for cid, (j, acc) in points.items()
        if not any((j2 <= j and a2 >= acc) and (j2 < j or a2 > acc) for other, (j2, a2) in points.items() if other != cid)
    }
    assert set(a.pareto) == expected and expected
    js = [points[c][0] for c in a.pareto]
    assert js == sorted(js)


def test_decomposition_splits_the_energy_change_exactly() -> None:
    # drop1_all: 10 % less power, 5 % more time per token than the baseline.
    res = [result("baseline", r, joules=1000.0, seconds=100.0) for r in (1, 2, 3)]
    res += [result("drop1_all", r, experts=1, target="all", ord_=1, joules=1000.0 * 0.9 * 1.05, seconds=105.0)
            for r in (1, 2, 3)]
    c = analyze(res).config("drop1_all")
    d = c.decomposition
    assert d is not None
    assert d.d_ln_power == pytest.approx(math.log(0.9), rel=1e-6)
    assert d.d_ln_time == pytest.approx(math.log(1.05), rel=1e-6)
    assert d.d_ln_energy == pytest.approx(d.d_ln_power + d.d_ln_time, abs=1e-12)
    assert c.jpt_change_pct == pytest.approx((0.9 * 1.05 - 1) * 100)


def test_paper_tables_all_early_late_and_best_of() -> None:
    a = analyze(paper_like_results())
    titles = [t.title for t in a.tables]
    assert titles == ["All layers", "Early layers only", "Late layers only", "Best of"]
    for t in a.tables[:3]:
        assert len(t.rows) == 9 and t.rows[0][1] == "baseline"
        assert all(len(r) == len(t.headers) for r in t.rows)
    best = {r[0]: r for r in a.tables[3].rows}
    assert best["All layers"][5] == str(analyze(paper_like_results()).depths[0].epi_optimal)
    assert best["All layers"][6] == "3"
    assert "Overall" in best


def test_plan_without_targets_gets_one_table_and_no_curves() -> None:
    res = [result(f"model{i}", r, ord_=i, joules=1000.0 + 100 * i) for i in range(3) for r in (1, 2)]
    a = analyze(res)
    assert a.curves == () and a.depths == ()
    assert a.baseline_id == "model0"


# ------------------------------------------------------------------------------------------ from a ledger


async def test_analysis_of_a_ledger_campaign(tmp_path: Path) -> None:
    built = await build_campaign(tmp_path / "ledger.sqlite", only=["baseline", "drop1_all", "drop2_all"],
                                 invalid={("drop2_all", 1): ["window start not covered by samples on pi0"]})
    async with await Ledger.open(built.path, readonly=True) as ledger:
        res = await ledger.results(built.campaign_id)
    a = analyze(res, simulated=True, campaign_id=built.campaign_id)
    assert len(a.repetitions) == 9 and a.simulated
    c = a.config("drop2_all")
    assert (c.valid, c.invalid) == (2, 1)
    valid_epis = sorted(built.epi[("drop2_all", r)]["epi"]["value"] for r in (2, 3))
    assert c.epi is not None and c.epi.median == pytest.approx(sum(valid_epis) / 2)
    assert (c.epi.lo, c.epi.hi) == pytest.approx(tuple(valid_epis))


def test_every_configuration_appears_in_some_table() -> None:
    res = paper_like_results() + [result("qwen3-8b", r, ord_=25, joules=800.0) for r in (1, 2)]
    a = analyze(res)
    titles = [t.title for t in a.tables]
    assert titles == ["All layers", "Early layers only", "Late layers only", "Other configurations", "Best of"]
    shown = {row[1] for t in a.tables[:4] for row in t.rows}
    assert shown == {c.config_id for c in a.configs}
    only_models = analyze([result(f"model{i}", 1, ord_=i) for i in range(3)])
    assert [t.title for t in only_models.tables][0] == "All configurations"
    assert len(only_models.tables[0].rows) == 3


def test_epi_uncertainty_combines_meter_and_accuracy() -> None:
    res = [result("baseline", r, acc=0.8) for r in (1, 2, 3)]
    # composite standard error of two equally weighted tasks: sqrt(0.01^2 + 0.02^2) / 2
    se = math.sqrt(0.01**2 + 0.02**2) / 2
    expected = math.hypot(0.01, se / 0.8) * 100
    a = analyze(res, meter_uncertainty_pct=1.0)
    assert a.repetitions[0].accuracy_stderr == pytest.approx(se)
    assert a.config("baseline").epi_uncertainty_pct == pytest.approx(expected)
    assert a.tables[0].title == "All configurations" and a.tables[0].rows[0][-1] == f"{expected:.1f}%"
    unknown = analyze(res)  # no meter figure: no uncertainty, never a pretended exact meter
    assert unknown.config("baseline").epi_uncertainty_pct is None


# ------------------------------------------------------------------------------------------ edge cases


def test_empty_campaign_has_no_figures_and_no_tables() -> None:
    a = analyze([])
    assert a.configs == () and a.curves == () and a.depths == () and a.pareto == () and a.tables == ()
    assert a.baseline_id is None and a.counts["repetitions"] == 0


def test_baseline_with_every_repetition_invalid_leaves_changes_and_accuracy_depth_missing() -> None:
    res = [r for r in paper_like_results() if r.trial.config_id != "baseline"]
    res += [result("baseline", k, valid=False, reasons=("throttled",)) for k in (1, 2, 3)]
    a = analyze(res)
    assert a.baseline_id == "baseline" and a.config("baseline").epi is None
    assert all(c.epi_change_pct is None and c.accuracy_change_pts is None and c.decomposition is None
               for c in a.configs)
    all_layers = next(d for d in a.depths if d.target == "all")
    # No baseline accuracy: no accuracy-optimal depth, but the EPI-optimal one is still found.
    epi = {n: 1.2 * (1 - 0.012 * n) / (0.76 - 0.0015 * n**1.5) for n in range(1, 9)}  # the fixture's model
    assert all_layers.accuracy_optimal is None and all_layers.epi_optimal == min(epi, key=epi.__getitem__)
    assert all(p.experts > 0 for c in a.curves for p in c.points)  # no point at 0 without a baseline figure


def test_campaign_without_a_baseline_configuration() -> None:
    res = [r for r in paper_like_results() if r.trial.config_id != "baseline"]
    a = analyze(res)
    assert a.baseline_id is None
    assert all(c.jpt_change_pct is None for c in a.configs)
    assert {d.target for d in a.depths} == {"all", "early", "late"}
    assert all(d.accuracy_optimal is None for d in a.depths)
    assert len(a.pareto) >= 1


def test_non_finite_figures_are_missing_never_numbers() -> None:
    nan = float("nan")
    r = repetitions([result("baseline", 1, joules=nan, acc=nan)])[0]
    assert r.joules is None and r.jpt is None and r.accuracy is None and r.epi is None and not r.usable
    a = analyze([result("baseline", 1, joules=nan), result("baseline", 2, joules=1000.0)])
    assert a.config("baseline").jpt is not None and a.config("baseline").jpt.n == 1


def test_a_task_without_a_reported_stderr_takes_the_binomial_one_from_its_item_count() -> None:
    r = result("baseline", 1, acc=0.5)
    r.epi["accuracy"]["stderr"] = {"mmlu": None, "arc_challenge": 0.02}
    r.benchmark["task_details"] = {"mmlu": {"n": 100, "weight": 1.0}, "arc_challenge": {"n": 50, "weight": 1.0}}
    rep = repetitions([r])[0]
    assert rep.accuracy_stderr == pytest.approx(math.sqrt(0.05**2 + 0.02**2) / 2)  # sqrt(0.25 / 100) = 0.05
    del r.benchmark["task_details"]
    assert repetitions([r])[0].accuracy_stderr is None  # no stderr and no item count: unknown, not 0


def test_a_valid_repetition_scoring_zero_keeps_its_accuracy_and_energy_in_the_tables() -> None:
    """Accuracy 0 leaves EPI undefined, but the 0 % and the J/token are real: they are shown."""
    res = [result("baseline", k, acc=0.76) for k in (1, 2, 3)]
    res += [result("drop8_all", k, experts=8, target="all", ord_=1, acc=0.0, joules=900.0) for k in (1, 2, 3)]
    a = analyze(res)
    c = a.config("drop8_all")
    assert c.valid == 3 and c.accuracy is not None and c.accuracy.median == 0.0
    assert c.jpt is not None and c.jpt.median == pytest.approx(0.9) and c.epi is None
    assert c.accuracy_change_pts == pytest.approx(-76.0)
    row = next(r for r in a.tables[0].rows if r[1] == "drop8_all")
    assert row[3] == "3/3" and row[6] == "0.0" and row[8] == "–"
    assert next(d for d in a.depths if d.target == "all").accuracy_optimal == 0
    assert a.counts["valid"] == 6
