"""The console's speed: CPU of the TUI process, sample-to-screen latency, time to first frame.

Setup: a lab service on the simulated lab with the meter at 50 Hz (``epiconsole service`` with a
temporary config and ledger), exactly as ``epiconsole`` would start it.

- CPU: a real ``epiconsole tui --attach-only`` process in a pseudo-terminal of 160x50 (the output is
  drained as a terminal would), dashboard visible, for 30 s after a 3 s warm-up; CPU time from
  ``/proc/<pid>/stat`` (user + system) over wall time. Target <= 15 % of one core.
- Time to first frame: from spawning ``epiconsole tui --attach-only`` to the first screen drawn in the
  pty (the top bar's text appears); median of 3. Target <= 1.5 s.
- Sample to screen: the same app in this process (headless, same options), for 20 s: for every
  redraw, wall time after the redraw minus the host time of the newest meter sample it shows (the
  live meter section's ``last_sample``: the sample whose watts the tiles show). Also reported: the
  TUI's own part, wall time after the redraw minus the service's publish time (``heartbeat``). Median and p95. Target: median <= 250 ms.

Prints figures and a JSON line; exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import pty
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Report, header  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
SIZE = (160, 50)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def write_config(d: Path, rate_hz: float) -> Path:
    cfg = d / "lab.toml"
    cfg.write_text(
        f'[lab]\nname = "bench lab"\nsimulated = true\nledger = "{d / "ledger.sqlite"}"\n\n'
        f"[meter]\nrate_hz = {rate_hz}\n"
    )
    return cfg


def env_for(d: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        XDG_CONFIG_HOME=str(d / "xdg-config"),
        XDG_DATA_HOME=str(d / "xdg-data"),
        TERM="xterm-256color",
        COLUMNS=str(SIZE[0]),
        LINES=str(SIZE[1]),
    )
    env.pop("EPICONSOLE_CONFIG", None)
    return env


def start_service(d: Path, cfg: Path) -> subprocess.Popen[bytes]:
    from epiconsole.commands.tui import service_alive

    log = open(d / "service.log", "wb")  # noqa: SIM115  (lives as long as the service)
    proc = subprocess.Popen(
        [sys.executable, "-m", "epiconsole", "service", "--config", str(cfg)],
        stdout=log,
        stderr=log,
        env=env_for(d),
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if service_alive(d / "ledger.sqlite"):
            return proc
        if proc.poll() is not None:
            raise SystemExit(f"the lab service exited: {(d / 'service.log').read_text()[-500:]}")
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit("the lab service did not come up in 60 s")


def spawn_tui(d: Path, cfg: Path) -> tuple[int, int]:
    """Fork ``epiconsole tui`` onto a new pty of SIZE; returns (pid, master fd)."""
    pid, fd = pty.fork()
    if pid == 0:
        os.execvpe(
            sys.executable,
            [sys.executable, "-m", "epiconsole", "tui", "--attach-only", "--config", str(cfg)],
            env_for(d),
        )
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", SIZE[1], SIZE[0], 0, 0))
    return pid, fd


def drain(fd: int, until: float, needle: bytes = b"") -> bool:
    """Read the pty until ``until`` (monotonic); True as soon as ``needle`` was seen (if given)."""
    tail = b""
    while time.monotonic() < until:
        r, _, _ = select.select([fd], [], [], 0.05)
        if fd in r:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                return False
            if needle:
                tail = (tail + chunk)[-4096:]
                if needle in tail:
                    return True
    return False


def stop_tui(pid: int, fd: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        drain(fd, time.monotonic() + 0.1)
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            break
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    os.close(fd)


def first_frame(d: Path, cfg: Path) -> float:
    t0 = time.monotonic()
    pid, fd = spawn_tui(d, cfg)
    seen = drain(fd, t0 + 20, b"EPICONSOLE")
    elapsed = time.monotonic() - t0
    stop_tui(pid, fd)
    return elapsed if seen else float("inf")


def cpu_share(d: Path, cfg: Path, seconds: float) -> float:
    pid, fd = spawn_tui(d, cfg)
    drain(fd, time.monotonic() + 3.0)  # warm-up: start, first frames, first results read
    c0, t0 = cpu_seconds(pid), time.monotonic()
    drain(fd, t0 + seconds)
    c1, t1 = cpu_seconds(pid), time.monotonic()
    stop_tui(pid, fd)
    return (c1 - c0) / (t1 - t0)


async def latency(d: Path, seconds: float) -> tuple[list[float], list[float]]:
    """(sample to screen, publish to screen) per redraw that showed a newly published state."""
    from epiconsole import config
    from epiconsole.commands.tui import build_options
    from screens.app import EpiConsoleApp, StateUpdated

    cfg = config.load(str(d / "lab.toml"))
    opts = build_options(cfg, d / "ledger.sqlite", view_only=True, attached=True, theme=None)
    samples: list[float] = []
    previous: list[float] = [0.0]
    tui_part: list[float] = []

    class Timed(EpiConsoleApp):
        def on_state_updated(self, message: StateUpdated) -> None:
            super().on_state_updated(message)
            live = message.state.live
            if live.meter.last_sample and live.service.heartbeat != previous[0]:
                now = time.time()
                samples.append(now - live.meter.last_sample)
                tui_part.append(now - live.service.heartbeat)
            previous[0] = live.service.heartbeat

    app = Timed(opts)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(2.0)
        samples.clear()
        tui_part.clear()
        await pilot.pause(seconds)
    return samples, tui_part


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="CPU measurement length")
    parser.add_argument("--rate", type=float, default=50.0, help="meter rate (Hz)")
    args = parser.parse_args()
    header("bench/tui.py: console CPU, sample-to-screen latency, first frame")
    rep = Report("tui")
    d = Path(tempfile.mkdtemp(prefix="epiconsole-bench-tui-"))
    cfg = write_config(d, args.rate)
    service = start_service(d, cfg)
    try:
        frames = sorted(first_frame(d, cfg) for _ in range(3))
        rep.figure(
            "first_frame_s", round(statistics.median(frames), 3), "time to first frame (median of 3)", "s"
        )
        share = cpu_share(d, cfg, args.seconds)
        rep.figure(
            "cpu_pct",
            round(100 * share, 1),
            f"TUI CPU, meter {args.rate:g} Hz, {args.seconds:g} s",
            "% of a core",
        )
        lat, tui_lat = asyncio.run(latency(d, 20.0))
        lat.sort()
        med = statistics.median(lat) if lat else float("inf")
        p95 = lat[int(0.95 * (len(lat) - 1))] if lat else float("inf")
        rep.figure("latency_median_ms", round(1000 * med, 1), "sample to screen, median", "ms")
        rep.figure("latency_p95_ms", round(1000 * p95, 1), "sample to screen, p95", "ms")
        rep.figure(
            "publish_to_screen_median_ms",
            round(1000 * statistics.median(tui_lat), 1) if tui_lat else None,
            "of which: service publish to screen (the TUI's part), median",
            "ms",
        )
        rep.figure("redraws", len(lat), "redraws measured")
        rep.target("first frame <= 1.5 s", statistics.median(frames) <= 1.5)
        rep.target("TUI CPU <= 15% of one core", share <= 0.15)
        rep.target("sample to screen median <= 250 ms", med <= 0.25)
    finally:
        service.terminate()
        try:
            service.wait(timeout=20)
        except subprocess.TimeoutExpired:
            service.kill()
        shutil.rmtree(d, ignore_errors=True)
    return rep.finish()


if __name__ == "__main__":
    sys.exit(main())
