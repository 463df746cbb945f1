"""``epiconsole`` (no command) / ``epiconsole tui``: the console.

The console is always a *viewer* of the lab service's ledger. When a service is already running for
the ledger (its live heartbeat is fresh) the console attaches to it. Otherwise it starts one as a
child process (``epiconsole service``, on the simulated lab when no lab config is found) and attaches
to that. A separate process rather than a thread in the TUI because:

* quitting a viewer must never affect a run: when you quit while a run is active, the service keeps
  running (and the next ``epiconsole`` attaches to it); with no active run it is stopped;
* the service ingests the meter at up to 50 Hz and must not stall while the terminal redraws (one
  GIL, one event loop would tie them together), and a crash on one side leaves the other alone;
* the console then works exactly the same on the panel, over SSH and in a browser.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from epiconsole.cli import add_config_argument

HELP = "the console (default): live dashboard, matrix, curves, nodes and log; attaches to a running lab service"

#: How long a freshly started service may take to publish its first heartbeat before the console says so.
SERVICE_START_TIMEOUT_S = 30.0
ACTIVE_RUN_STATES = frozenset({"running", "pausing", "paused", "suspended", "aborting"})


def configure(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument("--ledger", metavar="FILE", help="attach to this ledger instead of the config's")
    parser.add_argument("--attach-only", action="store_true",
                        help="only attach to a running lab service; never start one")
    parser.add_argument("--viewer", action="store_true",
                        help="never start a lab service; show the ledger and wait for one (the web view uses this)")
    parser.add_argument("--view-only", action="store_true", help="refuse lab commands (start, pause, abort, ...)")
    parser.add_argument("--theme", metavar="NAME", help="theme (default: [ui] theme, else epi-dark)")


def read_live(ledger_path: Path) -> dict[str, Any]:
    """The ledger's live sections (plain sqlite, read-only; used before any event loop runs)."""
    import json
    import sqlite3
    from urllib.parse import quote

    if not ledger_path.exists():
        return {}
    try:
        with sqlite3.connect(f"file:{quote(str(ledger_path))}?mode=ro", uri=True, timeout=5) as db:
            rows = db.execute("SELECT key, value FROM live").fetchall()
    except sqlite3.Error:
        return {}  # no live table yet (a ledger that was never served)
    return {k: json.loads(v) for k, v in rows}


def service_alive(ledger_path: Path) -> bool:
    from epiconsole.live import ServiceLive

    return ServiceLive.from_dict(read_live(ledger_path).get("service")).alive()


def run_state(ledger_path: Path) -> str:
    from epiconsole.live import RunLive

    return RunLive.from_dict(read_live(ledger_path).get("run")).state


class ChildService:
    """A lab service this console started: the console shows "starting…" until its first heartbeat and
    the reason if it exits (from the last line of its log); never blocks the console's event loop."""

    def __init__(self, proc: Any, log_path: Path, start_timeout_s: float = SERVICE_START_TIMEOUT_S) -> None:
        import time

        self.proc = proc
        self.log_path = log_path
        self.start_timeout_s = start_timeout_s
        self.started = time.monotonic()
        self._failure: str | None = None

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def failure(self) -> str | None:
        if self._failure is None and self.proc.poll() is not None:
            try:
                lines = self.log_path.read_text(errors="replace").strip().splitlines()
            except OSError:
                lines = []
            last = lines[-1][:100] if lines else "no output"
            self._failure = f"the lab service exited ({last}); see {self.log_path}"
        return self._failure


def start_service(config: str | None, ledger_path: Path) -> ChildService:
    """Start ``epiconsole service`` detached from our terminal (its own session: Ctrl-C in the console's
    terminal does not reach it); the console shows its progress instead of waiting here."""
    import importlib.util
    import subprocess
    import sys

    from epiconsole.errors import UserError

    if importlib.util.find_spec("epiconsole.commands.service") is None:
        raise UserError(
            f"No lab service is running for {ledger_path}, and this installation has no `epiconsole service` "
            "command to start one; start the service another way or pass --ledger."
        )
    log_path = ledger_path.with_suffix(".service.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "epiconsole", "service"]
    if config:
        cmd += ["--config", config]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    return ChildService(proc, log_path)


def stop_service(proc: Any, timeout_s: float = 15.0) -> None:
    import signal
    import subprocess

    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def build_options(cfg: Any, ledger_path: Path, *, view_only: bool, attached: bool, theme: str | None,
                  banner: str = "", service_child: Any = None) -> Any:
    """The console's options from the lab config (shared with ``epiconsole serve``)."""
    from epiconsole.config import config_dir
    from epiconsole.errors import UserError
    from epiconsole.matrix import plan_for
    from screens.controllers.matrix import planned_configs
    from screens.options import ConsoleOptions

    def source() -> Any:
        from screens.controllers.source import LedgerSource

        return LedgerSource(ledger_path)

    try:
        plan = plan_for(cfg)
        planned, plan_name = planned_configs(plan), plan.name
    except (UserError, OSError):
        # A broken plan file is the service's error to report (it cannot start); the console still opens.
        planned, plan_name = (), ""
    return ConsoleOptions(
        source_factory=source,
        planned=planned,
        plan_name=plan_name,
        simulated=bool(cfg.simulated),
        node_order=tuple(cfg.cluster.nodes),
        root=cfg.cluster.root,
        channels=dict(cfg.meter.channels),
        temp_max_c=cfg.thresholds.node_temp_max_c,
        tolerance_pts=cfg.thresholds.accuracy_tolerance_pts,
        allow_control=not view_only,
        theme=theme or cfg.ui.theme,
        keys=dict(cfg.ui.keys),
        user_theme_dir=config_dir() / "themes",
        attached=attached,
        banner=banner,
        service_child=service_child,
    )


def run(args: argparse.Namespace) -> int:
    from epiconsole import config
    from screens.app import make_app

    cfg = config.load(args.config)
    ledger_path = Path(args.ledger).expanduser() if args.ledger else cfg.ledger_path()
    proc = None
    banner = ""
    attached = service_alive(ledger_path)
    if not attached and not args.viewer:
        if args.attach_only:
            from epiconsole.errors import UserError

            raise UserError(
                f"No lab service is running for {ledger_path}: start `epiconsole` or `epiconsole service` first."
            )
        proc = start_service(args.config or os.environ.get(config.ENV_VAR), ledger_path)
        banner = f"starting the lab service (pid {proc.pid})" + (" on the simulated lab" if cfg.simulated else "")
    app = make_app(build_options(cfg, ledger_path, view_only=args.view_only, attached=attached or args.viewer,
                                 theme=args.theme, banner=banner, service_child=proc))
    try:
        app.run()
    finally:
        if proc is not None:
            state = run_state(ledger_path)
            if state in ACTIVE_RUN_STATES and proc.proc.poll() is None:
                print(f"epiconsole: the run goes on in the lab service (pid {proc.pid}); "
                      "run `epiconsole` to watch it again.")
            else:
                stop_service(proc.proc)
    return int(app.return_code or 0)
