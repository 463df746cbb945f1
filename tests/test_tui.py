"""Pilot tests of the console: mode switching, the detail view, themes, the command palette, the log's
filters, live updates and an unreadable ledger. Lab commands are in test_tui_commands.py."""

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
from screens.curves import CurvesScreen
from screens.dashboard import DashboardScreen
from screens.help import HelpScreen
from screens.log import LogScreen
from screens.matrix import MatrixDetailScreen, MatrixScreen
from screens.nodes import NodesScreen
from screens.widgets import NodeTile

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




async def test_matrix_lists_the_plan_before_the_first_campaign(tmp_path: Path) -> None:
    """A fresh lab: the Matrix shows what `s` will start; Enter on a pending repetition says why nothing opens."""
    from epiconsole.matrix import pruning_plan
    from screens.controllers.matrix import planned_configs

    path = tmp_path / "fresh.sqlite"
    async with await Ledger.open(path):
        pass
    app = make_app(console_options(path, planned=planned_configs(pruning_plan()), plan_name="pruning"))
    async with app.run_test(size=(80, 24)) as pilot:
        await _ready(app, pilot)
        await pilot.press("m")
        await pilot.pause()
        from textual.widgets import DataTable

        table = app.screen.query_one(DataTable)
        assert table.row_count == 25
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, MatrixScreen)  # no detail for a repetition that does not exist
        assert any("has not run yet" in str(n.message) for n in app._notifications)


async def test_a_silent_service_is_shown_as_not_live(lab_ledger: Path) -> None:
    """A viewer whose service stopped publishing says so, and the tiles show dashes, not frozen watts."""
    from tui_fixtures import FROZEN_NOW

    app = make_app(console_options(lab_ledger, clock=lambda: FROZEN_NOW + 60, poll_hz=20.0))
    async with app.run_test(size=SIZE) as pilot:
        async with asyncio.timeout(5):
            while not app.problem:
                await pilot.pause(0.05)
        assert app.problem.startswith("NOT LIVE")
        await pilot.pause()
        assert app.screen.query_one("#tile-0 .watts", Digits).value == "--.-"
