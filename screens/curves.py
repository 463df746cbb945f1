"""Curves: EPI vs experts dropped per layer target with spread and accuracy overlaid, the EPI-optimal
and accuracy-optimal depths, the Pareto view (J/token vs accuracy) and the paper's results table.
Charts redraw only when their data changed and only while this screen is visible."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import DataTable, Static
from textual_plotext import PlotextPlot

from screens.base import ConsoleScreen
from screens.controllers.curves import CurvesView
from themes import color, series_colors

TARGET_SERIES = {"all": 0, "early": 1, "late": 3}


class CurvesScreen(ConsoleScreen):
    SCREEN_TITLE = "Curves"

    def __init__(self) -> None:
        super().__init__()
        self._drawn: tuple[CurvesView, str] | None = None

    def body(self) -> ComposeResult:
        with VerticalScroll(id="curves-body"):
            yield Static("", id="curves-summary", classes="line")
            with Horizontal(id="curves-plots"):
                yield PlotextPlot(id="epi-plot")
                yield PlotextPlot(id="pareto-plot")
            table: DataTable[object] = DataTable(id="results-table", cursor_type="row", zebra_stripes=True)
            yield table

    def on_mount(self) -> None:
        table = self.query_one("#results-table", DataTable)
        for key, title in (("config", "config"), ("experts", "dropped"), ("target", "layers"), ("jpt", "J/token"),
                           ("acc", "accuracy"), ("epi", "EPI (median ± half range)"), ("delta", "ΔEPI vs base"),
                           ("valid", "valid reps")):
            table.add_column(title, key=key)
        super().on_mount()

    def render_body(self) -> None:
        app = self.console
        v = app.curves_ctl.view(app.state.results)
        key = (v, app.theme)
        if self._drawn == key:
            return  # same data, same theme: nothing to redraw
        self._drawn = key
        summary = Text()
        summary.append(f"{v.complete}/{v.total} configurations complete  ", style="bold")
        summary.append(v.summary)
        summary.append(f"  (accuracy tolerance {v.tolerance_pts:g} pt)", style="dim")
        self.query_one("#curves-summary", Static).update(summary)
        self._draw_epi(v)
        self._draw_pareto(v)
        table = self.query_one("#results-table", DataTable)
        table.clear()
        for r in v.table:
            table.add_row(r.config_id, r.experts, r.target, Text(r.jpt, justify="right"),
                          Text(r.accuracy, justify="right"), Text(r.epi, justify="right", style="bold"),
                          Text(r.delta_epi, justify="right"), r.valid, key=r.config_id)

    def _draw_epi(self, v: CurvesView) -> None:
        vars_ = self.app.theme_variables
        colors = series_colors(vars_)
        plot = self.query_one("#epi-plot", PlotextPlot)
        plt = plot.plt
        plt.clear_data()
        plt.clear_figure()
        any_data = False
        for curve in v.curves:
            if not curve.points:
                continue
            any_data = True
            c = colors[TARGET_SERIES[curve.target]]
            xs = [p.experts for p in curve.points]
            plt.plot(xs, [p.epi.median for p in curve.points], label=f"EPI {curve.target}", color=c, marker="hd")
            half = [((p.epi.hi or 0.0) - (p.epi.lo or 0.0)) / 2 for p in curve.points]
            if any(half):
                plt.error(xs, [p.epi.median for p in curve.points], yerr=half, color=c)
            acc = [p.accuracy.median * 100 if p.accuracy.median is not None else None for p in curve.points]
            if all(a is not None for a in acc):
                plt.plot(xs, acc, yside="right", color=c, marker="·")
            for depth, tag in ((curve.epi_optimal, "E"), (curve.accuracy_optimal, "A")):
                if depth is not None:
                    p = next(p for p in curve.points if p.experts == depth)
                    if p.epi.median is not None:
                        plt.text(tag, depth, p.epi.median, color=c, style="bold")
        plt.xticks(list(range(0, 9)))
        plt.title("EPI (left, lower is better, bars = spread) · accuracy % (right, ·)"
                  if any_data else "EPI vs experts dropped: waiting for valid results")
        plt.xlabel("experts dropped  (E = EPI-optimal, A = accuracy-optimal)")
        plot.refresh()

    def _draw_pareto(self, v: CurvesView) -> None:
        vars_ = self.app.theme_variables
        plot = self.query_one("#pareto-plot", PlotextPlot)
        plt = plot.plt
        plt.clear_data()
        plt.clear_figure()
        front = [p for p in v.pareto if p.on_front]
        rest = [p for p in v.pareto if not p.on_front]
        if rest:
            plt.scatter([p.jpt for p in rest], [p.accuracy * 100 for p in rest], color=color(vars_, "stage-idle"),
                        marker="dot", label="dominated")
        if front:
            front.sort(key=lambda p: p.jpt)
            ok = color(vars_, "node-ok")
            if len(front) > 1:
                plt.plot([p.jpt for p in front], [p.accuracy * 100 for p in front], color=ok, marker="braille")
            plt.scatter([p.jpt for p in front], [p.accuracy * 100 for p in front], color=ok, marker="◆",
                        label="Pareto front")
        plt.title("Pareto: J/token vs accuracy %" if v.pareto else "Pareto: waiting for valid results")
        plt.xlabel("J/token (left is better) · accuracy % up is better")
        plot.refresh()
