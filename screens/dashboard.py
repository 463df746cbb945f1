"""Dashboard: a tile per node with large live watts, cluster totals, the current stage and the lab's
health (ambient, meter)."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Container, Horizontal, Vertical
from textual.widgets import Digits, ProgressBar, Static

from screens.base import ConsoleScreen
from screens.controllers.dashboard import SERVICE_SILENT, DashboardView
from screens.controllers.fmt import MISSING
from screens.widgets import NodeTile, pack_parts, show_digits, show_text


class DashboardScreen(ConsoleScreen):
    SCREEN_TITLE = "Dashboard"

    def body(self) -> ComposeResult:
        with Container(id="tiles"):
            for i in range(len(self.console.options.node_order) or 4):
                yield NodeTile(i)
        with Horizontal(id="panels"):
            with Vertical(id="cluster", classes="panel"):
                with Horizontal(classes="big-row"):
                    yield Digits("--.-", id="cluster-w")
                    yield Static("W cluster", classes="unit")
                yield Static("", id="cluster-text", classes="line")
                yield Static("", id="energy", classes="line")
            with Vertical(id="run", classes="panel"):
                yield Static("", id="run-line", classes="line")
                yield Static("", id="stage-line", classes="line")
                yield Static("", id="suspender-line", classes="line")
                yield ProgressBar(total=100, show_eta=False, id="stage-progress")
                yield Static("", id="trials-line", classes="line")
            with Vertical(id="lab", classes="panel"):
                yield Static("", id="ambient", classes="line")
                yield Static("", id="meter", classes="line")
                yield Static("", id="service", classes="line")

    def on_mount(self) -> None:
        self.query_one("#cluster").border_title = "Cluster"
        self.query_one("#run").border_title = "Run"
        self.query_one("#lab").border_title = "Lab"
        super().on_mount()

    def render_body(self) -> None:
        app = self.console
        narrow = self.has_class("-narrow")
        v: DashboardView = app.dashboard_ctl.view(app.state, app.options.clock(), attached=app.options.attached)
        tiles = list(self.query(NodeTile))
        for tile, tv in zip(tiles, v.tiles, strict=False):
            tile.display = True
            tile.show(tv, v.stale)
        for tile in tiles[len(v.tiles):]:
            tile.display = bool(not v.tiles)  # before the first reading, keep empty tiles as placeholders
        show_digits(self.query_one("#cluster-w", Digits), v.cluster_w)
        show_text(self.query_one("#cluster-text", Static), Text(f"{v.cluster_w} W cluster", style="bold"))
        energy = Text()
        energy.append("window ", style="dim")
        energy.append(v.window_j, style="bold")
        energy.append("\n")
        if not narrow:
            energy.append("live ", style="dim")
        energy.append(v.live_jpt if v.live_jpt != MISSING else "— J/tok", style="bold")
        energy.append(f"  {v.window_tokens if v.window_tokens != MISSING else '— tok'}", style="dim")
        show_text(self.query_one("#energy", Static), energy)
        run = Text()
        run.append(v.run_state.upper(), style="bold reverse" if v.run_state not in ("idle", "finished") else "bold")
        if v.stale == SERVICE_SILENT:
            run.append(" last known", style="dim")
        # Narrow: the configuration on its own line, so "rep 1" is never split from its number.
        run.append(f"\n{v.run_line}" if narrow else f"  {v.run_line}")
        show_text(self.query_one("#run-line", Static), run)
        stage = Text()
        if not narrow:  # 25 columns: the stage's name and its time matter more than the label
            stage.append("stage ", style="dim")
        stage.append(v.stage, style="bold")
        if v.countdown:
            stage.append(f"  {v.countdown}")
        show_text(self.query_one("#stage-line", Static), stage)
        suspender = self.query_one("#suspender-line", Static)
        suspender.display = bool(v.suspender)
        if v.suspender:
            bad = self.console.theme_variables.get("node-fault", "red")
            show_text(suspender, Text(f" SUSPENDED: {v.suspender} ", style=f"bold reverse {bad}"))
        bar = self.query_one("#stage-progress", ProgressBar)
        # An indeterminate bar animates forever (CPU, unstable snapshots): hide it when progress is unknown.
        bar.display = v.stage_progress is not None
        if v.stage_progress is not None and bar.progress != round(100 * v.stage_progress, 1):
            bar.update(total=100, progress=round(100 * v.stage_progress, 1))
        show_text(self.query_one("#trials-line", Static), f"{v.trials} reps · ETA {v.eta}")
        amb = Text()
        amb.append("ambient ", style="dim")
        amb.append(v.ambient, style="bold" if v.ambient_ok is not False else "bold reverse")
        if v.ambient_ok is False:
            amb.append(" out of band", style="bold")
        show_text(self.query_one("#ambient", Static), amb)
        meter = Text()
        meter.append("meter ", style="dim")
        width = self.query_one("#meter", Static).content_region.width or 40
        meter.append(pack_parts(("meter " + v.meter).split(" · "), width)[len("meter "):],
                     style="" if v.meter_ok else "bold")
        show_text(self.query_one("#meter", Static), meter)
        show_text(self.query_one("#service", Static), Text(v.service, style="dim"))
