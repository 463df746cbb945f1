"""Pilot tests of lab commands from the console: they reach the lab service through the ledger,
destructive ones are confirmed, view-only consoles send nothing, keys are remapped; the service a
console starts is shown coming up or failing; the CLI and web entry points."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from tui_fixtures import build_lab_ledger, console_options, use_utc

from epiconsole.ledger import Ledger
from screens.app import make_app
from screens.confirm import ConfirmScreen
from screens.dashboard import DashboardScreen
from screens.matrix import MatrixScreen
from screens.widgets import TopBar

SIZE = (128, 37)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    use_utc()
    return build_lab_ledger(tmp_path_factory.mktemp("tui") / "seed.sqlite")


@pytest.fixture
def lab_ledger(seeded: Path, tmp_path: Path) -> Path:
    """A private copy per test: tests write commands into it."""
    path = tmp_path / "ledger.sqlite"
    shutil.copy(seeded, path)
    return path


class ServiceStub:
    """The lab service's side of the command queue, run against the same ledger file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: list[tuple[str, dict]] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async with await Ledger.open(self.path) as ledger:
            while not self._stop.is_set():
                for cmd in await ledger.pending_commands():
                    self.seen.append((cmd.verb, cmd.args))
                    await ledger.complete_command(cmd.id, True, {"message": "accepted"})
                await asyncio.sleep(0.05)

    async def __aenter__(self) -> ServiceStub:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task

    async def wait_for(self, n: int, timeout_s: float = 5.0) -> None:
        async with asyncio.timeout(timeout_s):
            while len(self.seen) < n:
                await asyncio.sleep(0.05)


async def _ready(app, pilot) -> None:  # type: ignore[no-untyped-def]
    await app.refresh_data()
    await pilot.pause()


async def test_pause_on_matrix_reaches_the_service(lab_ledger: Path) -> None:
    app = make_app(console_options(lab_ledger))
    async with ServiceStub(lab_ledger) as service, app.run_test(size=SIZE) as pilot:
        await _ready(app, pilot)
        await pilot.press("m")
        await pilot.pause()
        await pilot.press("p")
        await service.wait_for(1)
        async with asyncio.timeout(5):
            while app.last_outcome is None:
                await pilot.pause(0.05)
    assert service.seen == [("pause", {})]
    assert app.last_outcome.ok is True


async def test_abort_is_confirmed_and_skip_names_the_selected_configuration(lab_ledger: Path) -> None:
    app = make_app(console_options(lab_ledger))
    async with ServiceStub(lab_ledger) as service, app.run_test(size=SIZE) as pilot:
        await _ready(app, pilot)
        await pilot.press("m")
        await pilot.pause()
        await pilot.press("a")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        await pilot.pause(0.3)
        assert service.seen == []  # declined: nothing sent
        await pilot.press("down", "down", "k")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await service.wait_for(1)
        await pilot.press("a", "y")
        await service.wait_for(2)
    assert service.seen == [("skip", {"config_id": "drop1_early"}), ("abort", {})]


async def test_view_only_console_sends_nothing(lab_ledger: Path) -> None:
    app = make_app(console_options(lab_ledger, allow_control=False))
    async with ServiceStub(lab_ledger) as service, app.run_test(size=SIZE) as pilot:
        await _ready(app, pilot)
        await pilot.press("m", "p", "s", "a")
        await pilot.pause(0.3)
        assert not isinstance(app.screen, ConfirmScreen)
        assert "VIEW-ONLY" in str(app.screen.query_one(TopBar).render())
    assert service.seen == []


async def test_keys_are_remapped_from_the_config(lab_ledger: Path) -> None:
    app = make_app(console_options(lab_ledger, keys={"matrix": "x", "pause": "P"}))
    async with ServiceStub(lab_ledger) as service, app.run_test(size=SIZE) as pilot:
        await _ready(app, pilot)
        await pilot.press("m")
        await pilot.pause()
        assert isinstance(app.screen, DashboardScreen)
        await pilot.press("x")
        await pilot.pause()
        assert isinstance(app.screen, MatrixScreen)
        await pilot.press("P")
        await service.wait_for(1)
    assert service.seen[0][0] == "pause"


def test_tui_attach_only_without_service_says_what_to_do(lab_ledger: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from epiconsole.cli import main
    from epiconsole.commands.tui import service_alive

    assert not service_alive(lab_ledger)  # the seeded heartbeat is long stale
    assert main(["tui", "--attach-only", "--ledger", str(lab_ledger)]) == 2
    err = capsys.readouterr().err
    assert "No lab service is running" in err and "Traceback" not in err


def test_serve_command_is_view_only_by_default() -> None:
    from epiconsole.commands.serve import console_command

    assert console_command(None, False).endswith("tui --viewer --view-only")
    assert "--view-only" not in console_command("/tmp/my lab.toml", True)
    assert "'/tmp/my lab.toml'" in console_command("/tmp/my lab.toml", True)


def test_serve_offers_the_console_on_localhost(tmp_path: Path) -> None:
    """`epiconsole serve` answers on 127.0.0.1 with textual-serve's page for our console."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "data"), XDG_CONFIG_HOME=str(tmp_path / "config"))
    proc = subprocess.Popen([sys.executable, "-m", "epiconsole", "serve", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        page = ""
        while time.monotonic() < deadline and not page:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    page = r.read().decode()
            except OSError:
                time.sleep(0.2)
        assert "textual" in page.lower()
    finally:
        proc.terminate()
        out = proc.communicate(timeout=10)[0].decode(errors="replace")
    assert "view-only" in out and f"127.0.0.1:{port}" in out


async def test_console_shows_the_service_it_started_coming_up_or_failing(tmp_path: Path) -> None:
    import subprocess
    import sys

    from epiconsole.commands.tui import ChildService
    from screens.app import STARTING

    async def problem_of(child: ChildService, expect: str) -> str:
        app = make_app(console_options(tmp_path / "no-ledger-yet.sqlite", poll_hz=20.0, service_child=child))
        async with app.run_test(size=SIZE) as pilot:
            async with asyncio.timeout(10):
                while expect not in app.problem:
                    await pilot.pause(0.05)
            await pilot.pause()
            return str(app.screen.query_one(TopBar).render())

    log = tmp_path / "slow.log"
    with open(log, "wb") as f:
        slow = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], stdout=f, stderr=f)
    try:
        shown = await problem_of(ChildService(slow, log), STARTING)
        assert "ledger unreadable" not in shown  # a service on its way up is not an error
    finally:
        slow.kill()
        slow.wait()

    log = tmp_path / "bad.log"
    with open(log, "wb") as f:
        bad = subprocess.Popen([sys.executable, "-c", "print('meter: cannot open /dev/ttyACM0'); raise SystemExit(2)"],
                               stdout=f, stderr=f)
    bad.wait()
    shown = await problem_of(ChildService(bad, log), "cannot open /dev/ttyACM0")
    assert "the lab service exited" in shown
