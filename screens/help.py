"""Help: every key (as remapped by the user), what the screens show, and how to open viewers."""

from __future__ import annotations

from typing import cast

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

SCREENS_TEXT = (
    ("Dashboard", "per-node live watts, V, A, PF, temperature, throttling, sparkline; cluster watts, window energy, "
                  "J/token; stage, progress, ambient and meter health"),
    ("Matrix", "configurations x repetitions with a stage badge per repetition; Enter opens a repetition's power "
               "trace, per-task accuracy, validity reasons and provenance"),
    ("Curves", "EPI vs experts dropped (all/early/late) with spread and accuracy, optimal depths, Pareto, results table"),
    ("Nodes", "SSH and API state, temperature, clock, governor, throttling history; governor and restart actions"),
    ("Log", "the lab's event stream; v cycles the level, / filters by text"),
)


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,q", "app.pop_screen", "Close", id="help_close")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 100; max-width: 98%; height: 90%; border: heavy $primary;
                                  background: $surface; padding: 0 1; }
    """

    def compose(self) -> ComposeResult:
        from screens.app import EpiConsoleApp

        app = cast(EpiConsoleApp, self.app)
        keys = Table(title=Text('Keys (remap in the lab config: [ui] keys = { id = "key" })', style="bold"),
                     expand=True, show_edge=False)
        keys.add_column("key", style="bold", no_wrap=True)
        keys.add_column("id", style="dim", no_wrap=True)
        keys.add_column("action")
        seen: set[str] = set()
        for b in app._all_bindings():
            if b.id in seen or b.id is None:
                continue
            seen.add(b.id)
            key = app.key_for(b.id, b.key)
            shown = {"question_mark": "?", "slash": "/", "enter": "Enter", "escape": "Esc"}.get(key, key)
            keys.add_row(shown, b.id, b.tooltip or b.description or b.action)
        keys.add_row("ctrl+p", "", "command palette: every action by name")
        screens = Table(title=Text("Screens", style="bold"), expand=True, show_edge=False, show_header=False)
        screens.add_column("screen", style="bold", no_wrap=True)
        screens.add_column("what it shows")
        for name, text in SCREENS_TEXT:
            screens.add_row(name, text)
        viewers = Text(
            "\nViewers: run `epiconsole` again (e.g. over SSH) while a lab service runs and it attaches to the same "
            "live state; quitting a viewer never affects the run. `epiconsole serve` opens the console in a browser "
            "(localhost, view-only unless [web] allow_control = true).\n"
        )
        if not app.options.allow_control:
            viewers.append("This console is view-only: lab commands are refused.\n", style="bold")
        with VerticalScroll():
            yield Static(keys)
            yield Static(screens)
            yield Static(viewers)
