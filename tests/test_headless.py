"""Headless runs: dry run, exit codes, output modes and usage errors (fast; the full simulated runs are
in test_e2e.py)."""

from __future__ import annotations

import io
import json
import subprocess
import sys

from epiconsole import config as cfgmod
from epiconsole.engine.events import EngineEvent
from epiconsole.headless import Printer, estimate, exit_code, sim_config
from epiconsole.matrix import pruning_plan


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "epiconsole", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_dry_run_prints_plan_and_duration_without_touching_anything(tmp_path):
    ledger = tmp_path / "ledger.sqlite"
    conf = tmp_path / "lab.toml"
    conf.write_text(f'[lab]\nledger = "{ledger}"\n')
    out = cli("run", "--headless", "--dry-run", "--sim", "--config", str(conf), "--only", "baseline,drop3_late",
              "--reps", "2")
    assert out.returncode == 0, out.stderr
    assert "2 configurations x 2 repetitions" in out.stdout
    assert "drop3_late" in out.stdout and "expected duration" in out.stdout
    assert not ledger.exists()
    js = cli("run", "--json", "--dry-run", "--sim", "--config", str(conf))
    obj = json.loads(js.stdout)
    assert obj["event"] == "plan" and obj["plan"]["trials"] == 75 and obj["estimate"]["real_seconds"] > 0
    assert not ledger.exists()


def test_usage_errors_exit_2_in_one_line(tmp_path):
    out = cli("run", "--headless", "--dry-run", "--only", "drop9_all")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "drop9_all" in out.stderr and "Traceback" not in out.stderr
    out = cli("run", "--headless", "--reps", "0")
    assert out.returncode == 2 and "--reps" in out.stderr


def test_exit_codes():
    assert exit_code("finished", {"trials": 3, "valid": 3}) == 0
    assert exit_code("finished", {"trials": 3, "valid": 2, "invalid": 1}) == 1
    assert exit_code("finished", {"trials": 3, "valid": 2, "skipped": 1}) == 1
    assert exit_code("failed", {"trials": 3, "valid": 3}) == 1
    assert exit_code("aborted", {"trials": 3, "valid": 0}) == 3


def test_sim_config_tunes_only_defaults():
    base = cfgmod.sim_defaults()
    tuned = sim_config(base)
    assert tuned.sim.time_scale == 150.0 and tuned.meter.rate_hz == 1.25
    assert tuned.commands.validate.endswith("--no-generate")
    assert [t.name for t in tuned.benchmark.tasks] == ["epi_mmlu_local", "epi_arc_local", "epi_hellaswag_local"]
    import dataclasses

    mine = dataclasses.replace(base, sim=dataclasses.replace(base.sim, time_scale=30.0))
    assert sim_config(mine).sim.time_scale == 30.0
    # The real lab's thresholds are untouched.
    assert tuned.thresholds == base.thresholds


def test_estimate_scales_with_the_plan():
    cfg = sim_config(cfgmod.sim_defaults())
    full = estimate(cfg, pruning_plan())
    small = estimate(cfg, pruning_plan(repetitions=1))
    assert full["lab_seconds"] > small["lab_seconds"] > 0
    assert full["real_seconds"] == round(full["lab_seconds"] / 150)


def events() -> list[EngineEvent]:
    return [
        EngineEvent("campaign", {"status": "started", "trials_total": 2, "trials_done": 0}, 0.0, "started"),
        EngineEvent("stage", {"status": "started", "stage": "deploy", "config_id": "baseline", "rep": 1}, 1.0, "s"),
        EngineEvent("stage", {"status": "done", "stage": "deploy", "config_id": "baseline", "rep": 1}, 2.0, "d"),
        EngineEvent("suspended", {"reason": "meter: disconnected"}, 3.0, "suspended: meter"),
        EngineEvent("resumed", {"reason": "meter: disconnected"}, 4.0, "resumed"),
        EngineEvent("verdict", {"valid": True, "status": "done"}, 5.0, "baseline rep 1: valid"),
        EngineEvent("result", {"valid": True}, 6.0, "baseline rep 1: 1 J/token"),
        EngineEvent("paused", {}, 7.0, "not printed"),
    ]


def test_json_mode_prints_one_object_per_event():
    out = io.StringIO()
    p = Printer(out, "json")
    for ev in events():
        p(ev)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [o["event"] for o in lines] == ["campaign", "stage", "stage", "suspended", "resumed", "verdict", "result"]
    assert lines[3]["reason"] == "meter: disconnected"


def test_plain_mode_prints_lines_with_progress():
    out = io.StringIO()
    p = Printer(out, "plain")
    for ev in events():
        p(ev)
    text = out.getvalue().splitlines()
    assert len(text) == 6  # started stages are not printed when piped
    assert text[-1].endswith("[1/2] baseline rep 1: 1 J/token")


def test_rich_mode_shows_progress_and_event_lines():
    out = io.StringIO()
    p = Printer(out, "rich")
    p.start()
    for ev in events():
        p(ev)
    p.stop()
    text = out.getvalue()
    assert "baseline rep 1: valid" in text and "suspended: meter" in text
    assert "1/2" in text  # the progress bar counts repetitions
