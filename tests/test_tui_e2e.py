"""End to end: `epiconsole` in a real pseudo-terminal starts the lab service (simulated lab), shows the
four nodes, starts the matrix from the Matrix screen; a second `epiconsole` attaches as a viewer and
quitting either console leaves the run going."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import signal
import sqlite3
import struct
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)


def _spawn(env: dict[str, str], cols: int = 100, rows: int = 30) -> tuple[int, int]:
    import fcntl
    import termios

    pid, fd = pty.fork()
    if pid == 0:
        os.execvpe(sys.executable, [sys.executable, "-m", "epiconsole"], env)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    return pid, fd


def _read_until(fd: int, needles: tuple[bytes, ...], timeout_s: float) -> bytes:
    """Read the pty until every needle was seen (returns what was read)."""
    out = b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.1)
        if fd in r:
            try:
                out += os.read(fd, 65536)
            except OSError:
                break
            if all(n in out for n in needles):
                return out
    raise AssertionError(f"{needles} not seen in {timeout_s} s; last output: {out[-400:]!r}")


def _live(ledger: Path) -> dict[str, dict]:
    with sqlite3.connect(f"file:{ledger}?mode=ro", uri=True) as db:
        return {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM live")}


def _wait(pred, timeout_s: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _quit(pid: int, fd: int) -> bytes:
    os.write(fd, b"q")
    out = b""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.1)
        if fd in r:
            with contextlib.suppress(OSError):  # EIO once the console has closed the pty
                out += os.read(fd, 65536)
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            os.close(fd)
            return out
    os.kill(pid, signal.SIGKILL)
    raise AssertionError("the console did not quit on q")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_console_starts_service_runs_matrix_and_viewers_never_stop_it(tmp_path: Path) -> None:
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "data"), XDG_CONFIG_HOME=str(tmp_path / "config"),
               TERM="xterm-256color")
    env.pop("EPICONSOLE_CONFIG", None)
    ledger = tmp_path / "data" / "epiconsole" / "sim-ledger.sqlite"
    service_pid = 0
    pid, fd = _spawn(env)
    try:
        _read_until(fd, (b"SIMULATED", b"pi0", b"pi3"), 60)
        service_pid = _live(ledger)["service"]["pid"]
        assert _alive(service_pid)
        # The tiles show watts that change (the service publishes, the console polls).
        first = _wait(lambda: _live(ledger)["nodes"]["nodes"]["pi0"].get("W"), 10, "watts")
        _wait(lambda: _live(ledger)["nodes"]["nodes"]["pi0"].get("W") != first, 10, "changing watts")
        os.write(fd, b"m")
        _read_until(fd, (b"Matrix",), 10)
        os.write(fd, b"s")
        _wait(lambda: _live(ledger).get("run", {}).get("state") == "running", 30, "the matrix to start")
        _read_until(fd, (b"running",), 10)

        viewer, vfd = _spawn(env)
        _read_until(vfd, (b"SIMULATED", b"running"), 30)
        _quit(viewer, vfd)
        assert _alive(service_pid) and _live(ledger)["run"]["state"] in ("running", "pausing", "paused")

        out = _quit(pid, fd)
        pid = 0
        assert b"the run goes on in the lab service" in out
        time.sleep(1.0)
        assert _alive(service_pid)
        assert _live(ledger)["service"]["heartbeat"] > time.time() - 5
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
        if service_pid and _alive(service_pid):
            os.kill(service_pid, signal.SIGTERM)
            _wait(lambda: not _alive(service_pid), 20, "the service to stop")


def test_quitting_an_idle_console_stops_the_service_it_started(tmp_path: Path) -> None:
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "data"), XDG_CONFIG_HOME=str(tmp_path / "config"),
               TERM="xterm-256color")
    env.pop("EPICONSOLE_CONFIG", None)
    ledger = tmp_path / "data" / "epiconsole" / "sim-ledger.sqlite"
    pid, fd = _spawn(env, cols=80, rows=24)
    service_pid = 0
    try:
        _read_until(fd, (b"SIMULATED", b"pi3"), 60)
        service_pid = _live(ledger)["service"]["pid"]
        out = _quit(pid, fd)
        pid = 0
        assert b"the run goes on" not in out
        _wait(lambda: not _alive(service_pid), 20, "the idle service to stop with its console")
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
        if service_pid and _alive(service_pid):
            os.kill(service_pid, signal.SIGTERM)
