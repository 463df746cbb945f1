"""Notifications run a real shell command with the event as JSON on stdin; failures never raise."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
import time
from pathlib import Path

import pytest

from epiconsole.config import NotifyConfig, loads
from epiconsole.notify import EVENTS, Notifier, make_event, send


def _cmd(script: str) -> str:
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(script)}"


async def test_event_arrives_as_json_on_stdin_with_kind_in_env(tmp_path: Path) -> None:
    out = tmp_path / "got.json"
    cfg = NotifyConfig(command=f"cat > {shlex.quote(str(out))}; echo \"$EPICONSOLE_EVENT\" > {shlex.quote(str(out))}.kind")
    event = make_event("campaign_finished", campaign_id=7, simulated=True, message="25 of 25 done",
                       best_epi=float("nan"), trials_done=75)
    assert await send(cfg, event) is True
    got = json.loads(out.read_text())
    assert got["event"] == "campaign_finished"
    assert got["campaign_id"] == 7 and got["simulated"] is True and got["trials_done"] == 75
    assert got["best_epi"] is None  # NaN is missing, never a number
    assert Path(f"{out}.kind").read_text().strip() == "campaign_finished"


async def test_every_event_kind_is_accepted_and_unknown_kinds_are_a_bug() -> None:
    for kind in EVENTS:
        assert make_event(kind)["event"] == kind
    with pytest.raises(ValueError):
        make_event("campaign_exploded")


async def test_no_command_configured_is_a_quiet_success() -> None:
    logs: list[str] = []
    assert await send(NotifyConfig(command="  "), make_event("resumed"), log=logs.append) is True
    assert logs == []


async def test_nonzero_exit_is_logged_with_stderr_and_returns_false() -> None:
    logs: list[str] = []
    cfg = NotifyConfig(command="echo 'webhook said 403' >&2; exit 3")
    assert await send(cfg, make_event("campaign_failed"), log=logs.append) is False
    assert len(logs) == 1
    assert "campaign_failed" in logs[0] and "status 3" in logs[0] and "webhook said 403" in logs[0]


async def test_missing_program_is_a_logged_failure_not_an_exception() -> None:
    logs: list[str] = []
    cfg = NotifyConfig(command="/nonexistent/messenger --to lab")
    assert await send(cfg, make_event("suspended"), log=logs.append) is False
    assert logs and "status 127" in logs[0]


async def test_command_that_ignores_stdin_still_succeeds() -> None:
    assert await send(NotifyConfig(command="true"), make_event("resumed", big="x" * 200_000)) is True


async def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    # A pipeline whose child sleeps: the kill must reach the grandchild too.
    script = f"import os,time; open({str(pidfile)!r},'w').write(str(os.getpid())); time.sleep(60)"
    cfg = NotifyConfig(command=f"{_cmd(script)} | cat", timeout_s=1.0)
    logs: list[str] = []
    t0 = time.monotonic()
    assert await send(cfg, make_event("suspended"), log=logs.append) is False
    assert time.monotonic() - t0 < 8
    assert logs and "timed out" in logs[0]
    pid = int(pidfile.read_text())
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail(f"notifier child {pid} still alive after the timeout")


async def test_a_zero_timeout_still_has_a_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """``timeout_s = 0`` is not "wait forever": the fallback limit applies (shortened here)."""
    from epiconsole import notify

    monkeypatch.setattr(notify, "_FALLBACK_TIMEOUT_S", 0.5)
    logs: list[str] = []
    t0 = time.monotonic()
    assert await send(NotifyConfig(command="sleep 30", timeout_s=0), make_event("resumed"), log=logs.append) is False
    assert time.monotonic() - t0 < 10
    assert logs and "timed out after 0.5 s" in logs[0]


async def test_a_broken_log_callback_does_not_raise() -> None:
    def bad_log(_msg: str) -> None:
        raise RuntimeError("logger down")

    assert await send(NotifyConfig(command="exit 1"), make_event("campaign_failed"), log=bad_log) is False


async def test_notifier_runs_in_background_and_close_waits(tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    cfg = NotifyConfig(command=f"sleep 0.2; cat >> {shlex.quote(str(out))}")
    notifier = Notifier(cfg)
    tasks = [notifier.notify("suspended", campaign_id=1, suspender="meter silent"), notifier.notify("resumed", campaign_id=1)]
    # notify() returned without waiting for the commands: none has run yet (no wall-clock bound,
    # which a loaded machine could break).
    assert all(t is not None and not t.done() for t in tasks) and not out.exists()
    await notifier.aclose()
    kinds = sorted(json.loads(line)["event"] for line in out.read_text().splitlines())
    assert kinds == ["resumed", "suspended"]
    assert sorted(notifier.results) == [("resumed", True), ("suspended", True)]


async def test_notifier_close_cancels_what_overruns(tmp_path: Path) -> None:
    notifier = Notifier(NotifyConfig(command="sleep 30", timeout_s=30))
    task = notifier.notify("campaign_finished")
    assert task is not None
    await asyncio.sleep(0.1)
    t0 = time.monotonic()
    await notifier.aclose(timeout_s=0.3)
    assert time.monotonic() - t0 < 5
    assert task.cancelled()


async def test_disabled_notifier_starts_nothing() -> None:
    notifier = Notifier(NotifyConfig())
    assert notifier.notify("campaign_finished") is None
    await notifier.aclose()


def test_notify_section_loads_from_toml() -> None:
    cfg = loads('[notify]\ncommand = "curl -s -d @- https://ntfy.sh/lab"\ntimeout_s = 5\n')
    assert cfg.notify.command.startswith("curl") and cfg.notify.timeout_s == 5.0
