"""Log: the ledger's event stream, filterable by level (``v``) and by text (``/``)."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Input, RichLog, Static

from screens.base import ConsoleScreen
from screens.widgets import show_text

#: Lines the log view keeps (the controller's buffer holds more, for filtering).
LOG_LINES = 1000
LEVEL_STYLE = {"debug": "dim", "info": "", "warning": "node-warn", "error": "node-fault"}


class LogScreen(ConsoleScreen):
    SCREEN_TITLE = "Log"
    #: The log, not the filter box, has focus: typing a screen key must switch screens, not filter.
    AUTO_FOCUS = "#log-view"
    BINDINGS = [
        Binding("v", "cycle_level", "Level", id="log_level", tooltip="Log: cycle the lowest level shown"),
        Binding("slash", "filter", "Filter", id="log_filter", key_display="/", tooltip="Log: filter by text"),
        Binding("escape", "clear_filter", "Clear filter", id="log_clear", show=False, tooltip="Log: clear the filter"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._shown_key: tuple[int, tuple[str, str, str]] | None = None

    def body(self) -> ComposeResult:
        with Horizontal(id="log-bar"):
            yield Static("", id="log-status", classes="line")
            yield Input(placeholder="filter text (/)", id="log-input")
        yield RichLog(id="log-view", wrap=True, markup=False, max_lines=LOG_LINES, auto_scroll=True)

    def on_mount(self) -> None:
        inp = self.query_one(Input)
        inp.cursor_blink = self.console.options.animate
        super().on_mount()

    def render_body(self) -> None:
        ctl = self.console.log_ctl
        filters = (ctl.min_level, ctl.text, self.console.theme)
        if (ctl.last_id, filters) == self._shown_key:
            return
        v = ctl.view()
        show_text(self.query_one("#log-status", Static),
                  Text(f"level ≥ {v.min_level} · {v.shown}/{v.total} events", style="bold"))
        log = self.query_one(RichLog)
        if self._shown_key is not None and self._shown_key[1] == filters:
            # Same filters: append what is new instead of rewriting the whole log (events come in bursts).
            new = [line for line in v.lines if line.id > self._shown_key[0]]
        else:
            log.clear()
            new = list(v.lines[-LOG_LINES:])
        self._shown_key = (ctl.last_id, filters)
        vars_ = self.app.theme_variables
        for line in new:
            style = LEVEL_STYLE.get(line.level, "")
            # A grid row per event: a long message wraps under itself (hanging indent), not under the
            # timestamp, so the columns stay readable on an 80-column terminal.
            row = Table.grid(padding=(0, 1), expand=True)
            row.add_column(width=8, no_wrap=True)
            row.add_column(width=7, no_wrap=True)
            row.add_column(width=15, no_wrap=True, overflow="ellipsis")
            row.add_column(ratio=1)
            row.add_row(Text(line.time, style="dim"),
                        Text(line.level.upper(), style=f"bold {vars_.get(style, style)}"),
                        Text(line.kind, style="bold"), Text(line.message))
            log.write(row, expand=True)

    def action_cycle_level(self) -> None:
        self.console.log_ctl.cycle_level()
        self.render_body()

    def action_filter(self) -> None:
        self.query_one(Input).focus()

    def action_clear_filter(self) -> None:
        inp = self.query_one(Input)
        inp.value = ""
        self.console.log_ctl.text = ""
        self.query_one(RichLog).focus()
        self.render_body()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.query_one(RichLog).focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        self.console.log_ctl.text = event.value
        self.render_body()
