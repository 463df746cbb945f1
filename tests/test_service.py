"""The lab service as its own process: the lock, viewers reading live state, commands from another
process (a pause lands on the next stage boundary), and SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from epiconsole.ledger import Ledger, LedgerError
from epiconsole.live import LiveSnapshot
from epiconsole.service import ServiceLock, ServiceRunning

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def lab_dir():
    # Not under /tmp: the simulated machines give every host a private /tmp (see epiconsole.sim.shell).
    d = Path(tempfile.mkdtemp(prefix="epiconsole-service-", dir="/var/tmp"))
    (d / "lab.toml").write_text(f'[lab]\nledger = "{d}/ledger.sqlite"\nsimulated = true\n')
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_a_second_owner_is_refused_with_the_pid(tmp_path):
    ledger = tmp_path / "ledger.sqlite"
    first = ServiceLock(ledger)
    first.acquire()
    try:
        assert ServiceLock.holder(ledger) == os.getpid()
        with pytest.raises(ServiceRunning, match=f"already running \\(pid {os.getpid()}\\)"):
            ServiceLock(ledger).acquire()
    finally:
        first.release()
    assert ServiceLock.holder(ledger) is None
    again = ServiceLock(ledger)
    again.acquire()  # released locks can be taken again
    again.release()


async def live(ledger: Ledger) -> LiveSnapshot:
    return LiveSnapshot.from_live({k: v.value for k, v in (await ledger.get_live()).items()})


async def until(fn, timeout=60.0, what=""):
    deadline = time.monotonic() + timeout
    while True:
        value = await fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_viewer_sees_live_state_and_pause_takes_effect_at_the_next_boundary(lab_dir):
    conf = str(lab_dir / "lab.toml")
    proc = subprocess.Popen([sys.executable, "-m", "epiconsole", "service", "--sim", "--config", conf,
                             "--sim-dir", str(lab_dir / "simlab")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ledger_path = lab_dir / "ledger.sqlite"

        async def opened():
            return ledger_path.exists() and ServiceLock.holder(ledger_path) == proc.pid

        await until(opened, what="the service to hold its lock")

        async def readable():
            try:
                return await Ledger.open(ledger_path, readonly=True)
            except LedgerError:  # the service is creating the schema right now
                return None

        ledger = await until(readable, what="the ledger's schema")

        async def alive():
            snap = await live(ledger)
            return snap if snap.service.alive() and snap.meter.connected and snap.nodes.cluster_W else None

        snap = await until(alive, what="live state")
        assert snap.service.pid == proc.pid and snap.service.simulated
        assert set(snap.nodes.nodes) == {"pi0", "pi1", "pi2", "pi3"}
        assert all(n.W is not None and n.W > 0 for n in snap.nodes.nodes.values())

        # A second service for the same ledger is refused at once, naming the first.
        second = subprocess.run([sys.executable, "-m", "epiconsole", "service", "--sim", "--config", conf],
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and f"pid {proc.pid}" in second.stderr and "Traceback" not in second.stderr

        start = await ledger.put_command("start", {"only": ["baseline", "drop1_all"], "reps": 2})
        cmd = await ledger.wait_command(start, 30)
        assert cmd is not None and cmd.ok, cmd
        campaign_id = cmd.result["campaign_id"]

        async def in_stage():
            s = await live(ledger)
            return s.run if s.run.state == "running" and s.run.stage in ("stabilize", "benchmark") else None

        run = await until(in_stage, what="a measurement stage")
        assert run.campaign_id == campaign_id and run.trials_total == 4
        pause = await ledger.put_command("pause")
        done = await ledger.wait_command(pause, 30)
        assert done.ok
        t_pause = done.t_done  # when the service took the request (it polls its commands)

        async def paused():
            s = await live(ledger)
            return s.run.state == "paused"

        await until(paused, what="the pause")
        await asyncio.sleep(1.0)
        events = [e for e in await ledger.events_after(0, 5000) if e.kind.startswith("engine.")]
        after = [e for e in events if e.t >= t_pause]
        paused_at = next(i for i, e in enumerate(after) if e.data.get("status") == "paused")
        # Between the pause request and the pause: the stage in progress finished, none started.
        assert all(not (e.kind == "engine.stage" and e.data.get("status") == "started") for e in after[:paused_at])
        assert any(e.kind == "engine.stage" and e.data.get("status") == "done" for e in after[:paused_at])
        # While paused nothing starts (a DGX build stage already under way may still finish).
        assert all(not (e.kind == "engine.stage" and e.data.get("status") == "started") for e in after[paused_at + 1:])

        status = subprocess.run([sys.executable, "-m", "epiconsole", "status", "--json", "--config", conf],
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and json.loads(status.stdout)

        # A headless run started while the service owns the lab attaches to it instead of refusing:
        # its start is refused (a campaign runs), so it follows the running campaign.
        follower = subprocess.Popen([sys.executable, "-m", "epiconsole", "run", "--headless", "--json", "--sim",
                                     "--config", conf], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        # Let the follower attach before the campaign moves on: its start command is the next one. (On a
        # loaded machine it may take seconds to start; had the campaign ended by then, its start would
        # rightly begin a new campaign, and it would follow that one.)
        async def attached():
            c = await ledger.command(pause + 1)
            return c if c is not None and c.verb == "start" and c.ok is not None else None

        joined = await until(attached, what="the follower's start")
        assert joined.ok is False and joined.result["campaign_id"] == campaign_id

        resume = await ledger.put_command("resume")
        assert (await ledger.wait_command(resume, 30)).ok

        async def moving():
            evs = await ledger.events_after(events[-1].id if events else 0, 1000)
            return any(e.kind == "engine.stage" and e.data.get("status") == "started" for e in evs)

        await until(moving, what="the run to go on")
        abort = await ledger.put_command("abort")
        assert (await ledger.wait_command(abort, 30)).ok

        async def aborted():
            c = await ledger.campaign(campaign_id)
            return c.exit_status == "aborted"

        await until(aborted, what="the abort")
        out, err = follower.communicate(timeout=120)
        assert follower.returncode == 3, err  # it followed the campaign to its abort
        followed = [json.loads(line) for line in out.splitlines()]
        assert followed[-1]["event"] == "campaign" and followed[-1]["status"] == "aborted"
        assert any(e["event"] == "stage" for e in followed)
        bad = await ledger.put_command("skip", {"config_id": "nope"})
        assert (await ledger.wait_command(bad, 30)).ok is False
        await ledger.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert ServiceLock.holder(ledger_path) is None
        ledger = await Ledger.open(ledger_path, readonly=True)
        assert not (await live(ledger)).service.alive()
        await ledger.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
