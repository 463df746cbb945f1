"""Snapshots of every console screen on the seeded simulated lab with a frozen clock.

The ledger is written by ``tests/tui_fixtures.py`` (the simulated lab's physics with a fixed seed,
frozen ledger clock); the console reads it through the real ledger, with polling off and the clock
frozen, so the same SVG comes out every run. Update with ``pytest tests/test_snapshots.py
--snapshot-update`` and look at the SVGs before committing them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.pilot import Pilot
from tui_fixtures import build_lab_ledger, console_options, use_utc, write_fault_live

from screens.app import make_app

SIZES = {"wide": (160, 50), "small": (80, 24)}


@pytest.fixture(scope="module")
def lab_ledger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    use_utc()
    return build_lab_ledger(tmp_path_factory.mktemp("snap") / "ledger.sqlite")


def _before(*keys: str):  # type: ignore[no-untyped-def]
    async def run_before(pilot: Pilot) -> None:
        app = pilot.app
        await app.refresh_data()  # type: ignore[attr-defined]
        await pilot.pause()
        for key in keys:
            await pilot.press(key)
            await pilot.pause()
        await app.refresh_data()  # type: ignore[attr-defined]
        await pilot.pause()
        await pilot.pause(0.1)

    return run_before


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("screen", ["dashboard", "matrix", "curves", "nodes", "log"])
def test_screen(snap_compare, lab_ledger: Path, screen: str, size: str) -> None:  # type: ignore[no-untyped-def]
    key = {"dashboard": "d", "matrix": "m", "curves": "c", "nodes": "n", "log": "l"}[screen]
    app = make_app(console_options(lab_ledger))
    assert snap_compare(app, terminal_size=SIZES[size], run_before=_before(key))


def test_matrix_detail(snap_compare, lab_ledger: Path) -> None:  # type: ignore[no-untyped-def]
    # The cursor starts on baseline's first repetition: its power trace with the window markers.
    app = make_app(console_options(lab_ledger))
    assert snap_compare(app, terminal_size=SIZES["wide"], run_before=_before("m", "right", "right", "enter"))


def test_help(snap_compare, lab_ledger: Path) -> None:  # type: ignore[no-untyped-def]
    app = make_app(console_options(lab_ledger))
    assert snap_compare(app, terminal_size=SIZES["wide"], run_before=_before("question_mark"))


def test_daylight_dashboard_small(snap_compare, lab_ledger: Path) -> None:  # type: ignore[no-untyped-def]
    app = make_app(console_options(lab_ledger, theme="epi-daylight"))
    assert snap_compare(app, terminal_size=(128, 37), run_before=_before("d"))


def test_dashboard_in_trouble(snap_compare, lab_ledger: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A node unreachable, the meter unplugged, the room too warm, the run suspended: all visible at once."""
    import asyncio
    import shutil

    path = tmp_path / "faults.sqlite"
    shutil.copy(lab_ledger, path)
    asyncio.run(write_fault_live(path))
    app = make_app(console_options(path))
    assert snap_compare(app, terminal_size=(128, 37), run_before=_before("d"))


def test_matrix_before_first_campaign(snap_compare, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A fresh lab at 80x24: the plan's configurations as pending rows, so `s` is no leap in the dark."""
    import asyncio

    from epiconsole.ledger import Ledger
    from epiconsole.matrix import pruning_plan
    from screens.controllers.matrix import planned_configs

    async def empty() -> None:
        async with await Ledger.open(tmp_path / "fresh.sqlite"):
            pass

    asyncio.run(empty())
    app = make_app(console_options(tmp_path / "fresh.sqlite", planned=planned_configs(pruning_plan()),
                                   plan_name="pruning", simulated=True))
    assert snap_compare(app, terminal_size=SIZES["small"], run_before=_before("m"))
