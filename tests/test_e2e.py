"""End to end: the full simulated matrix (25 configurations x 3 repetitions) headless with --json, then
``epiconsole export`` and the consistency checks of the paper's data layout.

Everything real: the simulated lab in its own process (meter on a pty, SSH servers, HTTP API), the
surgeon toolkit run over SSH, lm-eval, SQLite. Time-scaled (x150) so a matrix takes minutes."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from epiconsole.headless import PRINTED

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture
def workdir():
    # Not under /tmp: the simulated machines give every host a private /tmp (see epiconsole.sim.shell).
    d = Path(tempfile.mkdtemp(prefix="epiconsole-e2e-", dir="/var/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def trace_joules(path: Path) -> float:
    """Trapezoid of each node's watts over device time inside the window, summed over nodes."""
    rows: dict[str, list[tuple[float, float]]] = defaultdict(list)
    with path.open() as f:
        lines = [ln for ln in f if not ln.startswith("#")]
    for row in csv.DictReader(lines):
        if row["in_window"] == "1":
            rows[row["node"]].append((float(row["device_s"]), float(row["watts"])))
    total = 0.0
    for pts in rows.values():
        pts.sort()
        t = np.array([p[0] for p in pts])
        w = np.array([p[1] for p in pts])
        total += float(np.sum((w[1:] + w[:-1]) / 2 * np.diff(t)))
    return total


def test_full_matrix_headless_then_export(workdir):
    conf = workdir / "lab.toml"
    conf.write_text(f'[lab]\nledger = "{workdir}/ledger.sqlite"\nsimulated = true\n')
    run = subprocess.run([sys.executable, "-m", "epiconsole", "run", "--headless", "--sim", "--json",
                          "--config", str(conf), "--sim-dir", str(workdir / "simlab")],
                         capture_output=True, text=True, timeout=840)
    assert run.returncode == 0, run.stderr[-3000:]
    events = [json.loads(line) for line in run.stdout.splitlines()]
    assert all(e["event"] in PRINTED for e in events)
    results = [e for e in events if e["event"] == "result"]
    verdicts = [e for e in events if e["event"] == "verdict"]
    assert len(results) == len(verdicts) == 75
    assert all(e["valid"] for e in results), [e for e in results if not e["valid"]][:3]
    assert {(e["config_id"], e["rep"]) for e in results} == {
        (c, r) for c in {e["config_id"] for e in results} for r in (1, 2, 3)}
    assert len({e["config_id"] for e in results}) == 25
    done = [(e["config_id"], e["rep"], e["stage"]) for e in events if e["event"] == "stage" and e["status"] == "done"]
    assert len([d for d in done if d[2] == "surgery"]) == 24  # every modified configuration, once
    assert len([d for d in done if d[2] == "benchmark"]) == 75
    assert events[-1]["event"] == "campaign" and events[-1]["status"] == "finished" and events[-1]["valid"] == 75

    out = workdir / "export"
    exp = subprocess.run([sys.executable, "-m", "epiconsole", "export", "--config", str(conf), "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert exp.returncode == 0, exp.stderr[-3000:]
    epis = sorted(out.rglob("epi_*.json"))
    assert len(epis) == 75
    for path in epis:
        d = json.loads(path.read_text())
        energy, accuracy, value = d["energy"], d["accuracy"], d["epi"]
        assert d["simulated"] is True
        assert energy["joules_per_token"] == pytest.approx(energy["total_joules"] / energy["total_tokens"], rel=1e-9)
        assert value["value"] == pytest.approx(energy["joules_per_token"] / accuracy["composite"], rel=1e-9)
        n = path.stem.split("_")[1]
        assert trace_joules(path.with_name(f"power_trace_{n}.csv")) == pytest.approx(energy["total_joules"], rel=0.01)
        for name in (f"run_{n}.json", f"benchmark_{n}.json"):
            assert path.with_name(name).is_file()
