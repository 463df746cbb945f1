"""Matrix: configurations x repetitions with a stage badge per repetition, per-configuration J/token,
accuracy, EPI and validity; run control (start, pause, resume, abort, skip, retry); and the detail
view of one repetition."""

from __future__ import annotations

import sqlite3

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, ProgressBar, Static
from textual_plotext import PlotextPlot

from epiconsole.errors import UserError
from screens.base import ConsoleScreen
from screens.controllers.commands import CommandRequest
from screens.controllers.matrix import DetailView, MatrixView, load_detail
from screens.widgets import TopBar
from themes import color, series_colors

KIND_STYLE = {
    "done": "stage-done",
    "invalid": "stage-bad",
    "failed": "stage-bad",
    "skipped": "stage-idle",
    "running": "stage-run",
    "pending": "stage-idle",
}


class MatrixScreen(ConsoleScreen):
    SCREEN_TITLE = "Matrix"
    BINDINGS = [
        Binding("s", "command('start')", "Start", id="start", tooltip="Matrix: start (or resume after a crash) the matrix"),
        Binding("p", "command('pause')", "Pause", id="pause", tooltip="Matrix: pause at the next stage boundary"),
        Binding("r", "command('resume')", "Resume", id="resume", tooltip="Matrix: resume a paused run"),
        Binding("a", "command('abort')", "Abort", id="abort", tooltip="Matrix: abort the run (asks first)"),
        Binding("k", "command('skip')", "Skip", id="skip", tooltip="Matrix: skip the selected configuration (asks first)"),
        Binding("y", "command('retry')", "Retry", id="retry", tooltip="Matrix: run the selected configuration again (asks)"),
        Binding("enter", "detail", "Detail", id="detail", show=False,
                tooltip="Matrix: open the selected repetition (trace, accuracy, validity, provenance)"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._view: MatrixView | None = None
        self._cells: dict[tuple[str, str], object] = {}
        self._reps = 0
        #: Below 110 columns the table drops the label column and shortens cells so EPI stays visible.
        self._narrow = False

    def body(self) -> ComposeResult:
        with Vertical(id="matrix-head", classes="panel"):
            yield Static("", id="matrix-status", classes="line")
            with Horizontal(classes="line-row"):
                yield ProgressBar(total=100, show_eta=False, id="matrix-progress")
                yield Static("", id="matrix-eta", classes="line")
        table: DataTable[object] = DataTable(id="matrix-table", cursor_type="cell", zebra_stripes=True)
        yield table

    def _columns(self, reps: int) -> None:
        table = self.query_one(DataTable)
        table.clear(columns=True)
        table.add_column("config", key="config")
        if not self._narrow:
            table.add_column("dropped", key="label")
        for r in range(1, reps + 1):
            table.add_column(f"rep {r}", key=f"rep{r}", width=9 if self._narrow else 10)
        # Fixed widths: the cells start as "—" and grow as results arrive; auto widths would clip them.
        for key, title, width in (("jpt", "J/tok", 6), ("acc", "acc" if self._narrow else "accuracy", 8),
                                  ("epi", "EPI", 6), ("valid", "valid" if self._narrow else "validity", 5 if self._narrow else 10)):
            table.add_column(title, key=key, width=width)
        self._reps = reps
        self._cells.clear()

    def render_body(self) -> None:
        app = self.console
        v = app.matrix_ctl.view(app.state)
        self._view = v
        status = Text()
        status.append(v.plan_name, style="bold")
        status.append(f"  ·  {v.current}")
        self.query_one("#matrix-status", Static).update(status)
        self.query_one("#matrix-progress", ProgressBar).update(total=100, progress=round(100 * v.progress, 1))
        self.query_one("#matrix-eta", Static).update(f" {v.progress_text}  ETA {v.eta}")
        table = self.query_one(DataTable)
        narrow = self.size.width < 110
        if narrow != self._narrow or v.reps != self._reps or table.row_count != len(v.rows) or not v.rows:
            self._narrow = narrow
            self._columns(v.reps)
            for row in v.rows:
                table.add_row(*self._row_cells(row), key=row.config_id)
            for row in v.rows:
                for key, value in zip(self._keys(), self._row_cells(row), strict=True):
                    self._cells[(row.config_id, key)] = value
            return
        # Update only what changed: a full rebuild would reset the cursor and cost a redraw per poll.
        for row in v.rows:
            for key, value in zip(self._keys(), self._row_cells(row), strict=True):
                if self._cells.get((row.config_id, key)) != value:
                    self._cells[(row.config_id, key)] = value
                    table.update_cell(row.config_id, key, value, update_width=True)

    def _keys(self) -> list[str]:
        label = [] if self._narrow else ["label"]
        return ["config", *label, *[f"rep{r}" for r in range(1, self._reps + 1)], "jpt", "acc", "epi", "valid"]

    def _row_cells(self, row) -> list[object]:  # type: ignore[no-untyped-def]
        vars_ = self.console.theme_variables
        cells: list[object] = [row.config_id] if self._narrow else [row.config_id, row.label]
        for c in row.cells:
            cells.append(Text(c.badge, style=f"bold {vars_.get(KIND_STYLE[c.kind], '')}"))
        for _ in range(self._reps - len(row.cells)):
            cells.append("")
        cells += [
            Text(row.jpt, justify="right"),
            Text(row.accuracy, justify="right"),
            Text(row.epi, justify="right", style="bold"),
            Text(row.validity.replace(" valid", "") if self._narrow else row.validity,
                 style=vars_.get("stage-bad", "") if row.validity_ok is False else ""),
        ]
        return cells

    def _selected(self) -> tuple[str | None, int | None]:
        """(config id, trial id) under the cursor; the trial of the repetition column, else the first."""
        table = self.query_one(DataTable)
        if self._view is None or not self._view.rows:
            return None, None
        row_i, col_i = table.cursor_coordinate
        row = self._view.rows[min(row_i, len(self._view.rows) - 1)]
        rep_i = col_i - (1 if self._narrow else 2)
        if 0 <= rep_i < len(row.cells):
            return row.config_id, row.cells[rep_i].trial_id
        return row.config_id, row.cells[0].trial_id if row.cells else None

    def action_command(self, verb: str) -> None:
        args = {}
        if verb in ("skip", "retry"):
            config_id, _ = self._selected()
            if config_id is None:
                self.notify("Select a configuration first.", severity="warning")
                return
            args = {"config_id": config_id}
        self.console.lab_command(CommandRequest(verb, args))

    def palette_commands(self) -> list[tuple[str, str, object]]:
        config_id, _ = self._selected()
        if config_id is None:
            return []
        return [
            (f"Skip {config_id}", "skip the selected configuration (asks first)", lambda: self.action_command("skip")),
            (f"Retry {config_id}", "run the selected configuration again (asks first)",
             lambda: self.action_command("retry")),
            ("Open the selected repetition", "power trace, accuracy, validity, provenance", self.action_detail),
        ]

    def action_detail(self) -> None:
        config_id, trial_id = self._selected()
        if trial_id is not None:
            self.app.push_screen(MatrixDetailScreen(trial_id))
        elif config_id is not None:
            self.notify(f"{config_id} has not run yet: start the matrix (s) to create its repetitions.",
                        severity="warning", timeout=4)

    def on_data_table_cell_selected(self, event: DataTable.CellSelected) -> None:
        self.action_detail()


class MatrixDetailScreen(Screen[None]):
    """One repetition: its power trace with the window markers, per-task accuracy, validity reasons,
    stage history and provenance."""

    BINDINGS = [Binding("escape", "app.pop_screen", "Back", id="back", tooltip="Detail: back to the Matrix")]

    def __init__(self, trial_id: int) -> None:
        super().__init__()
        self.trial_id = trial_id
        self.detail: DetailView | None = None
        self._drawn_theme = ""

    def compose(self) -> ComposeResult:
        yield TopBar()
        with Horizontal(id="detail-body"):
            yield PlotextPlot(id="detail-trace")
            with VerticalScroll(id="detail-side", classes="panel"):
                yield Static("loading…", id="detail-text")
        yield Footer(compact=True)

    async def on_mount(self) -> None:
        from typing import cast

        from screens.app import EpiConsoleApp

        app = cast(EpiConsoleApp, self.app)
        self.query_one("#detail-side").border_title = "Repetition"
        self._show_top_bar()
        try:
            source = await app.open_source()
            self.detail = await load_detail(source, app.state, self.trial_id, dict(app.options.channels))
        except (UserError, sqlite3.Error, OSError) as exc:
            # A ledger that went away (or is locked) is a visible state here, never a crash.
            self.query_one("#detail-text", Static).update(f"Could not read this repetition: {exc}")
            return
        self._draw()

    def _draw(self) -> None:
        self._drawn_theme = self.app.theme
        d = self.detail
        text = Text()
        if d is None:
            self.query_one("#detail-text", Static).update(
                "This repetition is not in the results yet; go back (Esc) and open it again in a moment.")
            return
        vars_ = self.app.theme_variables
        text.append(f"{d.config_id} · repetition {d.rep}\n", style="bold")
        verdict = {True: "VALID", False: "INVALID", None: "not judged"}[d.valid]
        text.append(f"{d.status} · {verdict}\n",
                    style=f"bold {vars_.get('stage-bad' if d.valid is False else 'stage-done', '')}")
        text.append(f"J/token {d.jpt}\naccuracy {d.accuracy}\nEPI {d.epi}\n")
        if d.reasons:
            text.append("\nwhy invalid\n", style="bold")
            for r in d.reasons:
                text.append(f"  • {r}\n")
        if d.tasks:
            text.append("\nper task\n", style="bold")
            for name, acc in d.tasks:
                text.append(f"  {name:<22} {acc:>7}\n")
        if d.stages:
            text.append("\nstages\n", style="bold")
            for stage, status, at in d.stages:
                text.append(f"  {stage:<10} {status:<9} {at}\n")
        if d.provenance:
            text.append("\nprovenance\n", style="bold")
            for k, val in d.provenance:
                text.append(f"  {k}: {val}\n", style="dim")
        self.query_one("#detail-text", Static).update(text)
        plot = self.query_one(PlotextPlot)
        plt = plot.plt
        plt.clear_data()
        plt.clear_figure()
        colors = series_colors(vars_)
        for i, tr in enumerate(d.traces):
            if tr.t:
                plt.plot(list(tr.t), list(tr.watts), label=tr.node, color=colors[i % len(colors)], marker="braille")
        if d.window_s is not None:
            mark = color(vars_, "stage-run")
            plt.vline(0.0, mark)
            plt.vline(d.window_s, mark)
        plt.title("power per node (W) · window between the markers" if d.traces else "no samples for this repetition")
        plt.xlabel("s from window begin")
        plot.refresh()

    def _show_top_bar(self) -> None:
        from typing import cast

        from screens.app import EpiConsoleApp

        app = cast(EpiConsoleApp, self.app)
        self.query_one(TopBar).show(
            "Matrix › detail", app.state.live.service.lab_name, app.simulated, not app.options.allow_control,
            app.state.live.run.state, app.problem, app.theme_variables.get("badge-sim", "orange"),
        )

    def render_state(self) -> None:
        """Detail data is a one-off read; only a theme change redraws it (the trace's colours). The top
        bar follows the live state (run state, a service that stops answering)."""
        if not self.is_mounted:
            return
        self._show_top_bar()
        if self.detail is not None and self.app.theme != self._drawn_theme:
            self._draw()
