"""Export: the paper's data/ layout from a real ledger file, checked by reading the files back."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from epiconsole.cli import main
from epiconsole.config import sim_defaults
from epiconsole.errors import UserError
from epiconsole.export import ExportResult, export_campaign, verify
from epiconsole.ledger import Ledger
from epiconsole.matrix import builtin
from tests.analysis_fixtures import Built, build_campaign

INVALID = {("drop3_early", 2): ["gap of 2.40 s on pi1 (limit 1 s)"]}
FAILED = {("drop8_late", 3)}


def _export(path: Path, out: Path, **kw: object) -> ExportResult:
    async def go() -> ExportResult:
        async with await Ledger.open(path, readonly=True) as ledger:
            return await export_campaign(ledger, out, cfg=sim_defaults(), **kw)  # type: ignore[arg-type]

    return asyncio.run(go())


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> tuple[Built, ExportResult]:
    """A simulated 25 x 3 campaign (one invalid, one failed repetition) exported once for the module."""
    root = tmp_path_factory.mktemp("export")
    built = asyncio.run(build_campaign(root / "ledger.sqlite", invalid=INVALID, failed=FAILED))
    return built, _export(built.path, root / "data")


def _integrate_csv(path: Path, duration: float) -> float:
    """Independent reading of a power trace: trapezoids of watts over device_s, clipped to the window."""
    text = path.read_text()
    per_node: dict[str, list[tuple[float, float]]] = {}
    for row in csv.DictReader(io.StringIO("".join(line for line in text.splitlines(True) if not line.startswith("#")))):
        per_node.setdefault(row["node"], []).append((float(row["device_s"]), float(row["watts"])))
    total = 0.0
    for pairs in per_node.values():
        t, w = np.array(sorted(pairs)).T
        grid = np.concatenate([[0.0], t[(t > 0) & (t < duration)], [duration]])
        total += float(np.trapezoid(np.interp(grid, t, w), grid))
    return total


def test_every_repetition_of_the_matrix_is_exported_complete(full: tuple[Built, ExportResult]) -> None:
    built, result = full
    out = result.out
    plan = builtin("pruning")
    assert result.simulated and result.campaign_id == built.campaign_id
    assert {p.name for p in out.iterdir() if p.is_dir()} == set(plan.ids())
    complete = [t for t in result.trials if t.complete]
    assert len(complete) == 74  # 75 minus the failed one
    for c in plan.configurations:
        for rep in (1, 2, 3):
            names = {f"run_{rep:03d}.json", f"power_trace_{rep:03d}.csv", f"benchmark_{rep:03d}.json",
                     f"epi_{rep:03d}.json"}
            present = {p.name for p in (out / c.id).glob(f"*_{rep:03d}.*")}
            if (c.id, rep) in FAILED:
                assert present == {f"run_{rep:03d}.json"}
            else:
                assert present == names


def test_consistency_of_every_repetition_read_back_independently(full: tuple[Built, ExportResult]) -> None:
    built, result = full
    checked = 0
    for (config_id, rep), stored in built.epi.items():
        doc = json.loads((result.out / config_id / f"epi_{rep:03d}.json").read_text())
        e, acc, value = doc["energy"], doc["accuracy"], doc["epi"]
        assert set(e) >= {"total_joules", "total_tokens", "joules_per_token", "avg_watts_cluster",
                          "peak_watts_cluster", "duration_seconds", "kwh_total"}
        assert set(value) >= {"value", "joules_per_token", "accuracy_composite"}
        assert "environment" in doc and "run_metadata" in doc
        assert e["total_joules"] == pytest.approx(stored["energy"]["total_joules"], rel=1e-12)
        assert value["value"] == pytest.approx(e["joules_per_token"] / acc["composite"], rel=1e-9)
        assert e["joules_per_token"] == pytest.approx(e["total_joules"] / e["total_tokens"], rel=1e-9)
        assert e["kwh_total"] == pytest.approx(e["total_joules"] / 3.6e6)
        traced = _integrate_csv(result.out / config_id / f"power_trace_{rep:03d}.csv", e["duration_seconds"])
        assert traced == pytest.approx(e["total_joules"], rel=0.01)
        checked += 1
    assert checked == 74
    assert verify(result.out) == (74, [])
    assert result.problems == ()


def test_simulated_is_said_in_every_file(full: tuple[Built, ExportResult]) -> None:
    _built, result = full
    files = [p for p in result.out.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert len(files) == result.files
    for p in files:
        if p.suffix == ".json":
            assert json.loads(p.read_text())["simulated"] is True, p
        else:
            assert p.read_text().splitlines()[0] == "# SIMULATED DATA", p
    epi = json.loads((result.out / "baseline" / "epi_001.json").read_text())
    assert epi["environment"]["simulated"] is True and epi["run_metadata"]["simulated"] is True


def test_invalid_and_failed_repetitions_keep_their_reasons(full: tuple[Built, ExportResult]) -> None:
    _built, result = full
    run = json.loads((result.out / "drop3_early" / "run_002.json").read_text())
    assert run["valid"] is False and run["reasons"] == INVALID[("drop3_early", 2)]
    assert [s["stage"] for s in run["stages"]] == ["benchmark", "calculate"]
    epi = json.loads((result.out / "drop3_early" / "epi_002.json").read_text())
    assert epi["run_metadata"]["valid"] is False
    failed = json.loads((result.out / "drop8_late" / "run_003.json").read_text())
    assert failed["status"] == "failed" and failed["reasons"] and failed["trace"] is None
    rows = list(csv.DictReader(io.StringIO((result.out / "summary.csv").read_text().split("\n", 1)[1])))
    drop3 = next(r for r in rows if r["config_id"] == "drop3_early")
    assert (drop3["valid"], drop3["invalid"]) == ("2", "1")
    # The meter's stated 1% (trial provenance) and the binomial accuracy errors give EPI a few percent.
    assert all(1.0 < float(r["epi_uncertainty_pct"]) < 10.0 for r in rows)
    reps = (result.out / "repetitions.csv").read_text()
    assert "gap of 2.40 s on pi1" in reps


def test_trace_rows_cover_the_window_with_one_sample_beyond_each_end(full: tuple[Built, ExportResult]) -> None:
    built, result = full
    text = (result.out / "drop5_all" / "power_trace_001.csv").read_text().split("\n", 1)[1]
    rows = list(csv.DictReader(io.StringIO(text)))
    assert {r["node"] for r in rows} == {"pi0", "pi1", "pi2", "pi3"}
    dev = sorted({float(r["device_s"]) for r in rows})
    duration = built.epi[("drop5_all", 1)]["energy"]["duration_seconds"]
    assert dev[0] < 0 <= dev[1] and dev[-2] <= duration < dev[-1]
    assert {r["in_window"] for r in rows if 0 <= float(r["device_s"]) <= duration} == {"1"}
    assert all(r["watts"] and r["volts"] and r["wh"] for r in rows)


def test_verify_catches_a_tampered_energy_figure(full: tuple[Built, ExportResult], tmp_path: Path) -> None:
    _built, result = full
    copy = tmp_path / "data"
    shutil.copytree(result.out, copy)
    p = copy / "drop2_all" / "epi_001.json"
    doc = json.loads(p.read_text())
    doc["energy"]["total_joules"] *= 1.05
    doc["energy"]["joules_per_token"] = doc["energy"]["total_joules"] / doc["energy"]["total_tokens"]
    doc["epi"]["value"] = doc["energy"]["joules_per_token"] / doc["accuracy"]["composite"]
    p.write_text(json.dumps(doc))
    (copy / "drop4_late" / "benchmark_002.json").unlink()
    # An invalid repetition is still held to the identities.
    q = copy / "drop3_early" / "epi_002.json"
    bad = json.loads(q.read_text())
    bad["epi"]["value"] *= 0.9
    q.write_text(json.dumps(bad))
    checked, problems = verify(copy)
    assert checked == 73
    assert any(x.startswith("drop2_all rep 1: trace_within_1pct failed") for x in problems)
    assert any(x.startswith("drop4_late rep 2: missing benchmark_002.json") for x in problems)
    assert any(x.startswith("drop3_early rep 2: epi_is_jpt_over_accuracy failed") for x in problems)
    assert len(problems) == 3


async def test_real_campaign_not_simulated_has_no_simulated_marks(tmp_path: Path) -> None:
    built = await build_campaign(tmp_path / "ledger.sqlite", only=["baseline", "drop1_all"], reps=1, simulated=False)
    async with await Ledger.open(built.path, readonly=True) as ledger:
        result = await export_campaign(ledger, tmp_path / "out", cfg=None)
    assert not result.simulated and result.complete == 2
    assert json.loads((tmp_path / "out" / "baseline" / "epi_001.json").read_text())["simulated"] is False
    for name in ("summary.csv", "report.md", "drop1_all/power_trace_001.csv"):
        assert "SIMULATED" not in (tmp_path / "out" / name).read_text()


async def test_out_dir_safety_and_re_export(tmp_path: Path) -> None:
    built = await build_campaign(tmp_path / "ledger.sqlite", only=["baseline"], reps=1)
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("precious")
    async with await Ledger.open(built.path, readonly=True) as ledger:
        with pytest.raises(UserError, match="not empty and not an earlier export"):
            await export_campaign(ledger, foreign, cfg=sim_defaults())
        first = await export_campaign(ledger, tmp_path / "out", cfg=sim_defaults())
        again = await export_campaign(ledger, tmp_path / "out", cfg=sim_defaults())  # an earlier export: fine
        with pytest.raises(UserError, match="holds no campaign 99"):
            await export_campaign(ledger, tmp_path / "out", cfg=sim_defaults(), campaign_id=99)
        blocker = tmp_path / "plain-file"
        blocker.write_text("x")
        with pytest.raises(UserError, match="Cannot create .*choose an --out where you can write"):
            await export_campaign(ledger, blocker / "data", cfg=sim_defaults())  # its parent is a file
    assert first.complete == again.complete == 1
    assert (foreign / "chapter1.tex").read_text() == "precious"


async def test_re_export_of_another_campaign_leaves_no_stale_repetitions(tmp_path: Path) -> None:
    big = await build_campaign(tmp_path / "big.sqlite", only=["baseline", "drop1_all"], reps=2)
    small = await build_campaign(tmp_path / "small.sqlite", only=["baseline"], reps=1)
    out = tmp_path / "out"
    async with await Ledger.open(big.path, readonly=True) as ledger:
        await export_campaign(ledger, out, cfg=sim_defaults())
    (out / "notes.txt").write_text("mine")  # the user's own file beside an export stays
    async with await Ledger.open(small.path, readonly=True) as ledger:
        result = await export_campaign(ledger, out, cfg=sim_defaults())
    assert result.complete == 1
    assert not (out / "drop1_all").exists() and not (out / "baseline" / "epi_002.json").exists()
    assert sorted(p.name for p in (out / "baseline").iterdir()) == [
        "benchmark_001.json", "epi_001.json", "power_trace_001.csv", "run_001.json"]
    assert (out / "notes.txt").read_text() == "mine"
    assert verify(out) == (1, [])


async def test_a_configuration_id_that_is_no_folder_name_never_writes_outside(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    async with await Ledger.open(path) as ledger:
        cid = await ledger.create_campaign("p", {}, "d", False, {})
        [trial] = await ledger.ensure_trials(cid, [{"config_id": "..", "rep": 1}])
        await ledger.set_trial(trial.id, status="failed", valid=False, reasons=["deploy failed"])
    out = tmp_path / "a" / "out"
    async with await Ledger.open(path, readonly=True) as ledger:
        with pytest.raises(UserError, match="cannot name a folder"):
            await export_campaign(ledger, out, cfg=None)
    assert not list((tmp_path / "a").glob("run_*"))


async def test_unfinished_campaign_exports_what_exists(tmp_path: Path) -> None:
    pending = {("drop1_all", 2), ("drop1_all", 3)}
    built = await build_campaign(tmp_path / "ledger.sqlite", only=["baseline", "drop1_all"], pending=pending, finish=None)
    async with await Ledger.open(built.path, readonly=True) as ledger:
        result = await export_campaign(ledger, tmp_path / "out", cfg=sim_defaults())
    assert result.complete == 4 and len(result.trials) == 4
    assert not (tmp_path / "out" / "drop1_all" / "run_002.json").exists()
    assert "status: unfinished" in (tmp_path / "out" / "report.md").read_text()


def _cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def test_cli_exports_and_reports(tmp_path: Path) -> None:
    built = asyncio.run(build_campaign(tmp_path / "ledger.sqlite", only=["baseline", "drop1_all", "drop2_all"], reps=2))
    code, out, _ = _cli(["export", "--ledger", str(built.path), "--out", str(tmp_path / "data"), "--json"])
    assert code == 0
    summary = json.loads(out)
    assert summary["complete"] == 6 and summary["checked"] == 6 and summary["problems"] == []
    code, out, _ = _cli(["export", "--ledger", str(built.path), "--out", str(tmp_path / "data")])
    assert code == 0 and "6 complete repetitions (6 valid)" in out and "SIMULATED" in out
    code, _, err = _cli(["export", "--ledger", str(tmp_path / "none.sqlite"), "--out", str(tmp_path / "x")])
    assert code == 2 and "No ledger at" in err and "Traceback" not in err
    assert math.isfinite(json.loads((tmp_path / "data" / "drop2_all" / "epi_002.json").read_text())["epi"]["value"])


@pytest.mark.slow
@pytest.mark.timeout(280)
def test_export_of_a_real_simulated_run(tmp_path: Path) -> None:
    """The engine's own results: `epiconsole run --headless --sim` on two configurations, then export."""
    import os
    import subprocess
    import sys

    cfg = tmp_path / "lab.toml"
    cfg.write_text(f'[lab]\nname = "sim"\nsimulated = true\nledger = "{tmp_path / "ledger.sqlite"}"\n')
    env = {k: v for k, v in os.environ.items() if k != "EPICONSOLE_CONFIG"}
    run = subprocess.run(
        [sys.executable, "-m", "epiconsole", "run", "--headless", "--sim", "--config", str(cfg),
         "--only", "baseline,drop1_all", "--reps", "1"],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path,
    )
    assert run.returncode in (0, 1), run.stdout[-2000:] + run.stderr[-2000:]  # 1: some repetition invalid
    code, out, err = _cli(["export", "--config", str(cfg), "--out", str(tmp_path / "data"), "--json"])
    summary = json.loads(out)
    assert summary["complete"] == 2 and summary["simulated"] is True, err
    for config_id in ("baseline", "drop1_all"):
        doc = json.loads((tmp_path / "data" / config_id / "epi_001.json").read_text())
        e = doc["energy"]
        assert doc["simulated"] is True and e["total_joules"] and e["total_tokens"] > 0
        assert e["joules_per_token"] == pytest.approx(e["total_joules"] / e["total_tokens"], rel=1e-9)
        assert doc["epi"]["value"] == pytest.approx(e["joules_per_token"] / doc["accuracy"]["composite"], rel=1e-9)
        traced = json.loads((tmp_path / "data" / config_id / "run_001.json").read_text())["trace"]["integrated_joules"]
        if doc["run_metadata"]["valid"]:
            assert traced == pytest.approx(e["total_joules"], rel=0.01)
    assert code == (1 if summary["problems"] else 0) and summary["problems"] == []


def test_missing_values_in_the_trace_are_empty_cells_never_zero() -> None:
    from epiconsole.export import Trace, trace_csv

    n = 3
    w = np.array([[10.0, 11.0], [np.nan, 11.5], [10.2, np.nan]])
    other = np.full((n, 2), 1.0)
    trace = Trace(t=np.array([1.0, 2.0, 3.0]), device_s=np.array([-0.5, 0.5, 1.5]), ms=np.array([0, 1000, 2000]),
                  in_window=np.array([False, True, False]), channels=((0, "pi0"), (1, "pi1")),
                  W=w, V=other, A=other, PF=other, VAR=other, Hz=other, Wh=np.array([[1.0, np.nan]] * n))
    text = trace_csv(trace, simulated=False)
    assert "nan" not in text.lower()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 6 and [r["node"] for r in rows[:2]] == ["pi0", "pi1"]
    assert rows[2]["watts"] == "" and rows[5]["watts"] == "" and rows[1]["wh"] == ""
    assert rows[3]["watts"] == "11.5000" and rows[3]["in_window"] == "1"


def test_read_trace_round_trips(tmp_path: Path) -> None:
    from epiconsole.export import read_trace

    p = tmp_path / "t.csv"
    p.write_text("# SIMULATED DATA\ntimestamp,device_s,node,watts\n1,0.5,pi0,\n1,0.0,pi0,3.5\n1,0,pi1,4\n")
    tr = read_trace(p)
    assert list(tr["pi0"][0]) == [0.0, 0.5] and tr["pi0"][1][0] == 3.5 and math.isnan(tr["pi0"][1][1])
    assert list(tr["pi1"][1]) == [4.0]


def test_peak_cluster_watts_skips_ticks_missing_a_node() -> None:
    """A tick without one node's reading has no cluster figure: its partial sum is not a peak."""
    from epiconsole.export import Trace

    w = np.array([[10.0, 11.0], [30.0, np.nan], [10.5, 11.5], [np.nan, np.nan]])
    other = np.full((4, 2), 1.0)
    trace = Trace(t=np.arange(4.0), device_s=np.arange(4.0), ms=np.arange(4) * 1000, in_window=np.ones(4, bool),
                  channels=((0, "pi0"), (1, "pi1")), W=w, V=other, A=other, PF=other, VAR=other, Hz=other, Wh=other)
    assert trace.peak_watts == pytest.approx(22.0)
    empty = Trace(t=np.arange(1.0), device_s=np.zeros(1), ms=np.zeros(1, int), in_window=np.ones(1, bool),
                  channels=((0, "pi0"), (1, "pi1")), W=np.array([[3.0, np.nan]]), V=other[:1], A=other[:1],
                  PF=other[:1], VAR=other[:1], Hz=other[:1], Wh=other[:1])
    assert empty.peak_watts is None


def test_trace_device_time_follows_the_board_when_host_times_swap() -> None:
    """Host times from the clock fit may swap neighbours by a hair; device time still follows ``ms``."""
    from epiconsole.export import build_trace
    from epiconsole.ledger import SampleBlock

    n = 40
    i = np.arange(n)
    t = 1_780_000_000.0 + i * 0.1
    t[20], t[21] = t[21] + 1e-4, t[20] + 1e-4 + 0.0999  # ticks 20 and 21 arrive swapped in host time
    W = np.full((n, 2), 5.0)
    block = SampleBlock.from_arrays(t, seq=i, ms=i * 100, W=W, Wh=np.cumsum(W, axis=0) * 0.1 / 3600)
    trace = build_trace(block, t[5], t[35], [(0, "pi0"), (1, "pi1")], scale=1.0)
    expected = (trace.ms - 500) / 1000.0  # device seconds from the window start (tick 5)
    assert np.allclose(trace.device_s, expected, atol=2e-3)
    assert bool(np.all(np.diff(trace.device_s) > 0))


def test_consistency_at_accuracy_zero_expects_no_epi() -> None:
    from epiconsole.export import consistency

    doc = {"energy": {"total_joules": 900.0, "total_tokens": 1000, "joules_per_token": 0.9},
           "accuracy": {"composite": 0.0}, "epi": {"value": None}}
    c = consistency(doc, 900.0)
    assert c["epi_is_jpt_over_accuracy"] is True and c["jpt_is_joules_over_tokens"] is True
    assert consistency({**doc, "epi": {"value": 5.0}}, 900.0)["epi_is_jpt_over_accuracy"] is False
