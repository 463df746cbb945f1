"""``epiconsole status``: ledger summary and live state, with no service, no ledger or a bad file."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from epiconsole.cli import main
from epiconsole.ledger import Ledger
from epiconsole.live import LiveSnapshot, MeterLive, NodeLive, NodesLive, RunLive, ServiceLive
from tests.analysis_fixtures import build_campaign

ROOT = Path(__file__).resolve().parent.parent


def _cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def ledger_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("status") / "ledger.sqlite"
    asyncio.run(build_campaign(
        path, only=["baseline", "drop1_all", "drop2_all"], reps=2,
        invalid={("drop2_all", 1): ["drop2_all throttled during the window"]},
        failed={("drop1_all", 2)}, pending={("drop2_all", 2)}, finish=None,
    ))
    return path


async def _publish(path: Path, snapshot: LiveSnapshot) -> None:
    async with await Ledger.open(path) as ledger:
        for key, value in snapshot.to_live().items():
            await ledger.set_live(key, value)


def test_no_ledger_yet_is_a_state_not_an_error(tmp_path: Path) -> None:
    code, out, err = _cli(["status", "--ledger", str(tmp_path / "nothing.sqlite")])
    assert code == 0 and err == ""
    assert "nothing has run" in out and "epiconsole run" in out
    code, out, _ = _cli(["status", "--json", "--ledger", str(tmp_path / "nothing.sqlite")])
    data = json.loads(out)
    assert code == 0 and data["ledger"]["exists"] is False and data["campaign"] is None


def test_campaign_counts_and_best_epi_without_a_service(ledger_path: Path) -> None:
    code, out, _ = _cli(["status", "--json", "--ledger", str(ledger_path)])
    assert code == 0
    data = json.loads(out)
    assert data["campaign"]["plan"] == "pruning" and data["campaign"]["simulated"] is True
    assert data["campaign"]["state"] == "unfinished"
    assert data["trials"] == {"total": 6, "done": 4, "valid": 3, "invalid": 1, "failed": 1, "skipped": 0, "pending": 1}

    async def best_valid() -> tuple[str, float]:
        async with await Ledger.open(ledger_path, readonly=True) as ledger:
            res = await ledger.results(data["campaign"]["id"])
        valid = [(r.trial.config_id, r.epi["epi"]["value"]) for r in res if r.trial.valid and r.epi]
        return min(valid, key=lambda x: x[1])

    cid, value = asyncio.run(best_valid())
    assert data["best"]["config_id"] == cid and data["best"]["epi"] == pytest.approx(value)
    assert data["live"]["service"]["alive"] is False and data["live"]["run"] is None
    code, text, _ = _cli(["status", "--ledger", str(ledger_path)])
    assert code == 0
    assert "(SIMULATED)" in text and "3 valid, 1 invalid, 1 failed" in text and "1 to go" in text
    assert f"best EPI  {value:.4g}" in text and cid in text
    assert "service   not running" in text and "--resume" in text  # an unfinished campaign and no service


def test_live_state_of_a_running_service(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    asyncio.run(build_campaign(path, only=["baseline"], reps=1, finish=None))
    now = time.time()
    snap = LiveSnapshot(
        # A heartbeat a minute ahead: however slow this box is between publishing and the two
        # status calls, the service never reads as stale (5 s) by accident.
        service=ServiceLive(pid=4242, host="orchestrator", started=now - 600, heartbeat=now + 60, lab_name="simulated lab",
                            simulated=True),
        meter=MeterLive(connected=True, port="/dev/pts/7", rate_hz=10.0, last_sample=now - 0.2, lost_lines=3,
                        bad_lines=1),
        nodes=NodesLive(nodes={f"pi{i}": NodeLive(name=f"pi{i}", W=10.5 + i, temp_c=55.0 + i, ssh_ok=i != 2,
                                                  throttled_now=("throttled",) if i == 3 else ())
                               for i in range(4)}, api_ok=True, cluster_W=48.0),
        run=RunLive(state="suspended", campaign_id=1, config_id="drop3_late", repetition=2, stage="benchmark",
                    trials_done=31, trials_total=75, eta_s=1800, suspender="pi2 unreachable"),
    )
    asyncio.run(_publish(path, snap))
    code, out, _ = _cli(["status", "--json", "--ledger", str(path)])
    live = json.loads(out)["live"]
    assert code == 0 and live["service"]["alive"] is True and live["service"]["pid"] == 4242
    assert live["meter"]["connected"] is True and live["meter"]["lost_lines"] == 3
    assert live["nodes"]["nodes"]["pi2"]["ssh_ok"] is False and live["nodes"]["cluster_W"] == 48.0
    assert live["run"]["state"] == "suspended" and live["run"]["suspender"] == "pi2 unreachable"
    code, text, _ = _cli(["status", "--ledger", str(path)])
    assert "service   running: pid 4242 on orchestrator" in text and "SIMULATED" in text
    assert "meter     connected on /dev/pts/7 at 10 Hz" in text and "3 lost" in text
    assert "pi2 12.5 W 57°C down" in text and "pi3 13.5 W 58°C ok THROTTLED" in text
    assert "run       suspended drop3_late rep 2 benchmark (31/75, ETA 30 min), suspended: pi2 unreachable" in text
    # The same state with a stale heartbeat: the service is gone and its last figures are not shown as live.
    stale = LiveSnapshot(service=ServiceLive(pid=4242, heartbeat=now - 60), meter=snap.meter, nodes=snap.nodes,
                         run=snap.run)
    asyncio.run(_publish(path, stale))
    code, out, _ = _cli(["status", "--json", "--ledger", str(path)])
    live = json.loads(out)["live"]
    assert live["service"]["alive"] is False and live["meter"] is None and live["run"] is None


def test_a_file_that_is_not_a_ledger_is_one_sentence_and_exit_2(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.sqlite"
    bogus.write_bytes(b"this is not sqlite at all" * 100)
    code, out, err = _cli(["status", "--ledger", str(bogus)])
    assert code == 2 and out == ""
    assert "not a readable epiconsole ledger" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_status_reads_the_config_ledger_path_and_stays_light(tmp_path: Path) -> None:
    cfg = tmp_path / "lab.toml"
    cfg.write_text(f'[lab]\nname = "t"\nsimulated = true\nledger = "{tmp_path / "l.sqlite"}"\n')
    probe = (
        "import contextlib, io, sys, json\nfrom epiconsole.cli import main\n"
        f"with contextlib.redirect_stdout(io.StringIO()):\n    assert main(['status', '--config', {str(cfg)!r}]) == 0\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'torch', 'lm_eval'))))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "EPICONSOLE_CONFIG"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
