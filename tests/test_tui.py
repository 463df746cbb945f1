"""Pilot tests of the console: mode switching, lab commands reaching the service through the ledger,
confirmation of destructive commands, view-only viewers, themes, key remapping and live updates."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from textual.widgets import Digits
from tui_fixtures import build_lab_ledger, console_options, use_utc

from epiconsole.errors import UserError
from epiconsole.ledger import Ledger
from epiconsole.live import LiveSnapshot
from screens.app import make_app
from screens.confirm import ConfirmScreen
from screens.curves import CurvesScreen
from screens.dashboard import DashboardScreen
from screens.help import HelpScreen
from screens.log import LogScreen
from screens.matrix import MatrixDetailScreen, MatrixScreen
from screens.nodes import NodesScreen
from screens.widgets import NodeTile, TopBar

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


async def test_keys_switch_modes(lab_ledger: Path) -> None:
    app = make_app(console_options(lab_ledger))
    async with app.run_test(size=SIZE) as pilot:
        await _ready(app, pilot)
        assert isinstance(app.screen, DashboardScreen)
        for key, cls in (("m", MatrixScreen), ("c", CurvesScreen), ("n", NodesScreen), ("l", LogScreen),
                         ("d", DashboardScreen)):
            await pilot.press(key)
            await pilot.pause()
            assert isinstance(app.screen, cls), key
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, DashboardScreen)


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


async def test_detail_view_opens_and_closes(lab_ledger: Path) -> None:
    app = make_app(console_options(lab_ledger))
    async with app.run_test(size=SIZE) as pilot:
        await _ready(app, pilot)
        await pilot.press("m", "right", "right", "enter")
        await pilot.pause(0.3)
        assert isinstance(app.screen, MatrixDetailScreen)
        assert app.screen.detail is not None and app.screen.detail.config_id == "baseline"
        assert app.screen.detail.traces
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, MatrixScreen)


async def test_theme_switch_recolours(lab_ledger: Path) -> None:
    app = make_app(console_options(lab_ledger))
    async with app.run_test(size=SIZE) as pilot:
        await _ready(app, pilot)
        assert app.theme == "epi-dark"
        dark_ok = app.theme_variables["node-ok"]
        tile = app.screen.query_one(NodeTile)
        dark_border = tile.styles.border_top[1]
        await pilot.press("t")
        await pilot.pause()
        assert app.theme == "epi-daylight"
        assert app.theme_variables["node-ok"] != dark_ok
        assert app.screen.query_one(NodeTile).styles.border_top[1] != dark_border
        await pilot.press("c")  # charts draw in the new theme without errors
        await pilot.pause()
        await pilot.press("t")
        await pilot.pause()
        assert app.theme == "epi-dark"


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


def test_unknown_action_or_theme_is_a_user_error(lab_ledger: Path) -> None:
    with pytest.raises(UserError, match="Unknown action 'fly'"):
        make_app(console_options(lab_ledger, keys={"fly": "f"}))
    with pytest.raises(UserError, match="Unknown theme 'neon'"):
        make_app(console_options(lab_ledger, theme="neon"))


async def test_live_updates_reach_the_tiles(lab_ledger: Path) -> None:
    """With polling on, a new live state written by the service shows up on the dashboard."""
    app = make_app(console_options(lab_ledger, poll_hz=10.0))
    async with await Ledger.open(lab_ledger) as writer:
        live = LiveSnapshot.from_live({k: e.value for k, e in (await writer.get_live()).items()})
        async with app.run_test(size=SIZE) as pilot:
            async with asyncio.timeout(5):
                while app.state.live.nodes.nodes.get("pi0") is None:
                    await pilot.pause(0.05)
            nodes = dict(live.nodes.nodes)
            from dataclasses import replace

            nodes["pi0"] = replace(nodes["pi0"], W=77.7)
            await writer.set_live("nodes", replace(live.nodes, nodes=nodes).to_dict())
            async with asyncio.timeout(5):
                while app.screen.query_one("#tile-0 .watts", Digits).value != "77.7":
                    await pilot.pause(0.05)


async def test_unreadable_ledger_is_a_visible_state_not_a_crash(tmp_path: Path) -> None:
    app = make_app(console_options(tmp_path / "missing.sqlite", poll_hz=20.0))
    async with app.run_test(size=SIZE) as pilot:
        async with asyncio.timeout(5):
            while not app.problem:
                await pilot.pause(0.05)
        assert "No ledger" in app.problem
        await pilot.press("m")
        await pilot.pause()
        assert isinstance(app.screen, MatrixScreen)


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


async def test_command_palette_lists_every_action(lab_ledger: Path) -> None:
    app = make_app(console_options(lab_ledger))
    async with app.run_test(size=SIZE) as pilot:
        await _ready(app, pilot)
        await pilot.press("m")
        await pilot.pause()
        titles = {c.title for c in app.get_system_commands(app.screen)}
        assert {"Show Dashboard", "Show Matrix", "Show Curves", "Show Nodes", "Show Log", "Help", "Next theme",
                "Start the matrix", "Pause the run", "Resume the run", "Abort the run", "Skip baseline",
                "Retry baseline"} <= titles
        await pilot.press("n")
        await pilot.pause()
        titles = {c.title for c in app.get_system_commands(app.screen)}
        assert "Set pi0's governor to performance" in titles and "Restart dllama on pi0" in titles


async def test_log_filters_by_level_and_text(lab_ledger: Path) -> None:
    from textual.widgets import Input, RichLog

    app = make_app(console_options(lab_ledger))
    async with app.run_test(size=SIZE) as pilot:
        await _ready(app, pilot)
        await pilot.press("l")
        await pilot.pause()
        log = app.screen.query_one(RichLog)

        def entries() -> list[str]:  # one per event (long messages wrap onto more lines)
            import re

            return [line.text for line in log.lines if re.match(r"\d\d:\d\d:\d\d ", line.text)]

        everything = len(entries())
        await pilot.press("v")  # info -> warning
        await pilot.pause()
        assert 0 < len(entries()) < everything
        assert all(" WARNING " in e or " ERROR " in e for e in entries())
        await pilot.press("v", "v", "v")  # error -> debug -> info
        await pilot.press("slash", *"INVALID", "enter")
        await pilot.pause()
        assert app.screen.query_one(Input).value == "INVALID"
        assert len(entries()) == 1 and "INVALID" in "".join(line.text for line in log.lines)
        await pilot.press("m")  # focus is back on the log: screen keys work again
        await pilot.pause()
        assert isinstance(app.screen, MatrixScreen)


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
