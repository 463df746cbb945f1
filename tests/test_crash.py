"""Crash safety: SIGKILL the headless run (lab service and engine) at 10 random moments across a
simulated run; each restart with --resume continues the same campaign at its first unfinished stage.
In the end every repetition appears exactly once, with results equal to an uninterrupted run of the
same seed: accuracy and token counts exactly (the simulated model answers each prompt the same way).
Energy is compared loosely (25%): in the time-compressed simulated lab every real second the host spends
between requests (lm-eval's own work) is 150 simulated seconds of idle cluster inside the window, so a
window's joules depend on how busy this machine was, in either run.

The plan is reduced to keep the test near two minutes: baseline and drop1_all, 2 repetitions each
(both kinds of configuration: with and without surgery)."""

from __future__ import annotations

import json
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PLAN = ["--only", "baseline,drop1_all", "--reps", "2"]
KILLS = 10


@pytest.fixture
def workdir():
    # Not under /tmp: the simulated machines give every host a private /tmp (see epiconsole.sim.shell).
    d = Path(tempfile.mkdtemp(prefix="epiconsole-crash-", dir="/var/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def conf(d: Path, name: str) -> str:
    path = d / f"{name}.toml"
    path.write_text(f'[lab]\nledger = "{d}/{name}.sqlite"\nsimulated = true\n')
    return str(path)


def command(config: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "epiconsole", "run", "--headless", "--json", "--sim", "--config", config,
            *PLAN, *extra]


def results(db_path: Path) -> dict[tuple[str, int], dict]:
    db = sqlite3.connect(db_path)
    try:
        rows = db.execute(
            "SELECT t.config_id, t.rep, t.status, t.valid, e.result, b.result FROM trials t "
            "LEFT JOIN epi_results e ON e.trial_id = t.id LEFT JOIN benchmark_results b ON b.trial_id = t.id"
        ).fetchall()
        out = {}
        for cid, rep, status, valid, epi, bench in rows:
            epi, bench = json.loads(epi) if epi else None, json.loads(bench) if bench else None
            out[(cid, rep)] = {"status": status, "valid": valid, "epi": epi, "bench": bench}
        return out
    finally:
        db.close()


def test_sigkill_at_random_moments_then_resume(workdir):
    reference = subprocess.run(command(conf(workdir, "reference"), "--sim-dir", str(workdir / "ref-lab")),
                               capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-2000:]

    crash_conf = conf(workdir, "crash")
    rng = random.Random(20261122)
    kills = []
    for _ in range(KILLS):
        proc = subprocess.Popen(command(crash_conf, "--resume", "--sim-dir", str(workdir / "crash-lab")),
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert proc.stdout is not None
        # A random moment: after 0 to 6 more engine events (0: during start-up), plus a random fraction
        # of a second, so kills land inside stages as well as between them.
        k = rng.randint(0, 6)
        last: dict = {}
        if k == 0:
            time.sleep(rng.uniform(0.5, 4.0))
        for _ in range(k):
            line = proc.stdout.readline()
            if not line:
                break
            last = json.loads(line)
        time.sleep(rng.uniform(0.0, 0.4))
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        proc.stdout.close()
        kills.append((k, last.get("event"), last.get("stage"), last.get("status")))
    final = subprocess.run(command(crash_conf, "--resume", "--sim-dir", str(workdir / "crash-lab")),
                           capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    lines = [json.loads(line) for line in final.stdout.splitlines()]
    assert lines[-1]["event"] == "campaign" and lines[-1]["status"] == "finished"

    db_path = workdir / "crash.sqlite"
    db = sqlite3.connect(db_path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT count(*) FROM campaigns").fetchone()[0] == 1  # every restart resumed it
        assert db.execute("SELECT count(*) FROM trials").fetchone()[0] == 4
        logged = db.execute("SELECT trial_id, count(*) FROM checkpoints WHERE stage = 'log' AND status = 'done' "
                            "GROUP BY trial_id").fetchall()
        assert sorted(n for _, n in logged) == [1, 1, 1, 1], logged  # each result logged exactly once
        kinds = {k for (k,) in db.execute("SELECT DISTINCT kind FROM events")}
        assert "engine.campaign" in kinds
    finally:
        db.close()

    crashed, ref = results(db_path), results(workdir / "reference.sqlite")
    assert set(crashed) == set(ref) == {("baseline", 1), ("baseline", 2), ("drop1_all", 1), ("drop1_all", 2)}
    for key, r in crashed.items():
        want = ref[key]
        assert r["status"] == "done" and r["valid"] == 1, (key, r["epi"]["validity"] if r["epi"] else None, kills)
        assert r["bench"]["tokens"] == want["bench"]["tokens"], key
        assert r["bench"]["tasks"] == want["bench"]["tasks"], key
        assert r["epi"]["accuracy"] == want["epi"]["accuracy"], key
        assert r["epi"]["energy"]["total_tokens"] == want["epi"]["energy"]["total_tokens"], key
        assert r["epi"]["energy"]["joules_per_token"] == pytest.approx(
            want["epi"]["energy"]["joules_per_token"], rel=0.25), key
    # The kills landed in different places (a spread of moments, not all in start-up).
    assert len({k[2] for k in kills}) >= 3, kills
