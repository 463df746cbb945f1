"""The frame every top-level screen shares: top bar, body, footer, and the render hook the app calls."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer

from screens.widgets import TopBar

if TYPE_CHECKING:
    from screens.app import EpiConsoleApp


class ConsoleScreen(Screen[None]):
    """A top-level mode. Subclasses implement :meth:`body` and :meth:`render_body`."""

    SCREEN_TITLE = ""
    #: Help and Quit again at screen level (same ids as the app's, so a remap applies to both): the
    #: footer lists screen bindings first, so on an 80-column terminal these two are never cut off.
    BINDINGS = [
        Binding("question_mark", "app.help", "Help", id="help", key_display="?", tooltip="this help"),
        Binding("q", "app.quit", "Quit", id="quit", tooltip="quit this console (a running matrix goes on)"),
    ]
    #: Set once mounted: a state that arrives while the screen is still composing waits for on_mount.
    ready = False

    @property
    def console(self) -> EpiConsoleApp:
        return cast("EpiConsoleApp", self.app)

    def compose(self) -> ComposeResult:
        yield TopBar()
        yield from self.body()
        yield Footer(compact=True)

    def body(self) -> ComposeResult:
        raise NotImplementedError

    def on_mount(self) -> None:
        self.ready = True
        self.render_state()

    def on_screen_resume(self) -> None:
        # Screens that were hidden skipped redraws: catch up with the latest state.
        self.render_state()

    def render_state(self) -> None:
        """Redraw from the app's latest state (the app calls this for the visible screen only)."""
        if not self.ready:
            return
        app = self.console
        live = app.state.live
        sim_color = app.theme_variables.get("badge-sim", "orange")
        self.query_one(TopBar).show(
            self.SCREEN_TITLE,
            live.service.lab_name,
            app.simulated,
            not app.options.allow_control,
            live.run.state,
            app.problem,
            sim_color,
        )
        self.render_body()

    def render_body(self) -> None:
        raise NotImplementedError
