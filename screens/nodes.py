"""Nodes: per node SSH/API state, temperature, clock, governor and throttling history, with actions
(set governor, restart worker or root) that are confirmed before they are sent."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from screens.base import ConsoleScreen
from screens.controllers.nodes import NodeRow

COLUMNS = (("name", "node"), ("role", "role"), ("ssh", "SSH"), ("process", "dllama"), ("temp", "temp"),
           ("clock", "ARM clock"), ("governor", "governor"), ("load", "load"), ("now", "throttled now"),
           ("since", "since boot"), ("checked", "checked"))
#: Columns left out below 110 columns, so the ones that matter stay on screen.
NARROW_SKIP = frozenset({"role", "load", "checked", "process"})


class NodesScreen(ConsoleScreen):
    SCREEN_TITLE = "Nodes"
    BINDINGS = [
        Binding("g", "governor", "Governor→performance", id="set_governor",
                tooltip="Nodes: set the selected node's governor to performance (asks first)"),
        Binding("w", "restart", "Restart dllama", id="restart",
                tooltip="Nodes: restart dllama on the selected node (worker, or the root's API; asks first)"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._rows: tuple[NodeRow, ...] = ()
        self._narrow: bool | None = None

    def body(self) -> ComposeResult:
        yield Static("", id="api-line", classes="line")
        table: DataTable[object] = DataTable(id="nodes-table", cursor_type="row")
        yield table
        with Vertical(id="throttle-history", classes="panel"):
            yield Static("", id="history-text")

    def _columns(self, narrow: bool) -> None:
        table = self.query_one(DataTable)
        table.clear(columns=True)
        for key, title in COLUMNS:
            if not (narrow and key in NARROW_SKIP):
                table.add_column(title, key=key)
        self._narrow = narrow
        self._rows = ()

    def on_mount(self) -> None:
        self.query_one("#throttle-history").border_title = "Throttling history"
        super().on_mount()

    def render_body(self) -> None:
        app = self.console
        v = app.nodes_ctl.view(app.state.live, app.options.node_order)
        vars_ = app.theme_variables
        api = Text("root API ", style="dim")
        # Only a known failure is red: "unknown" and "busy" are not alarms.
        api.append(v.api, style=f"bold {vars_.get('node-fault', '')}" if v.api_ok is False else "bold")
        self.query_one("#api-line", Static).update(api)
        table = self.query_one(DataTable)
        narrow = self.size.width < 110
        if narrow != self._narrow:
            self._columns(narrow)
        if v.rows != self._rows:
            bad = vars_.get("node-fault", "")
            warn = vars_.get("node-warn", "")
            cursor = table.cursor_row
            table.clear()
            for r in v.rows:
                cells = {
                    "name": Text(r.name, style="bold"), "role": r.role,
                    "ssh": Text(r.ssh, style="" if r.ssh_ok else f"bold {bad}"), "process": r.process,
                    "temp": r.temp, "clock": r.clock,
                    "governor": Text(r.governor, style="" if r.governor_ok else f"bold {warn}"), "load": r.load,
                    "now": Text(r.throttled_now, style="" if r.throttled_now == "no" else f"bold {bad}"),
                    "since": r.throttled_since, "checked": r.checked,
                }
                table.add_row(*(cells[k] for k, _ in COLUMNS if not (narrow and k in NARROW_SKIP)), key=r.name)
            if v.rows:
                table.move_cursor(row=min(cursor, len(v.rows) - 1))
            self._rows = v.rows
        history = "\n".join(v.history[:12]) if v.history else "no throttling seen since this console started"
        self.query_one("#history-text", Static).update(history)

    def _node(self) -> str | None:
        table = self.query_one(DataTable)
        if not self._rows:
            return None
        return self._rows[min(table.cursor_row, len(self._rows) - 1)].name

    def palette_commands(self) -> list[tuple[str, str, object]]:
        node = self._node()
        if node is None:
            return []
        return [
            (f"Set {node}'s governor to performance", "cpufreq governor (asks first)", self.action_governor),
            (f"Restart dllama on {node}", "worker, or the root's API (asks first)", self.action_restart),
        ]

    def action_governor(self) -> None:
        node = self._node()
        if node:
            self.console.lab_command(self.console.nodes_ctl.set_governor(node, "performance"))

    def action_restart(self) -> None:
        node = self._node()
        if node:
            self.console.lab_command(self.console.nodes_ctl.restart(node))
