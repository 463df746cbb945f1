"""Curves: EPI vs experts dropped per layer target with spread and accuracy overlaid, the EPI-optimal
and accuracy-optimal depths, the Pareto view (J/token vs accuracy) and the paper's results table.
Charts redraw only when their data changed and only while this screen is visible."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
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
        self._table_titles: list[str] = []

    def body(self) -> ComposeResult:
        with VerticalScroll(id="curves-body"):
            yield Static("", id="curves-summary", classes="line")
            with Horizontal(id="curves-plots"):
                yield PlotextPlot(id="epi-plot")
                yield PlotextPlot(id="pareto-plot")
            yield Vertical(id="results-tables")

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
        self._draw_tables(v)

    def _draw_tables(self, v: CurvesView) -> None:
        """The paper's tables (one per layer target, then the best-of), as ``epiconsole export`` writes them."""
        box = self.query_one("#results-tables", Vertical)
        titles = [t.title for t in v.tables]
        if titles != self._table_titles:
            box.remove_children()
            widgets = []
            for i, t in enumerate(v.tables):
                widgets.append(Static(Text(t.title, style="bold"), classes="table-title"))
                table: DataTable[object] = DataTable(id=f"paper-table-{i}", cursor_type="row", zebra_stripes=True,
                                                     classes="paper-table")
                widgets.append(table)
            box.mount_all(widgets)
            self._table_titles = titles
            self.call_after_refresh(self._fill_tables, v)
        else:
            self._fill_tables(v)

    def _fill_tables(self, v: CurvesView) -> None:
        for i, t in enumerate(v.tables):
            table = self.query_one(f"#paper-table-{i}", DataTable)
            if not table.columns:
                table.add_columns(*t.headers)
            table.clear()
            for row in t.rows:
                table.add_row(*(Text(cell, justify="right") if j >= 3 else cell for j, cell in enumerate(row)))

    def _draw_epi(self, v: CurvesView) -> None:
        vars_ = self.app.theme_variables
        colors = series_colors(vars_)
        plot = self.query_one("#epi-plot", PlotextPlot)
        plt = plot.plt
        plt.clear_data()
        plt.clear_figure()
        any_data = False
        acc_seen: list[float] = []
        for curve in v.curves:
            if not curve.points:
                continue
            any_data = True
            c = colors[TARGET_SERIES[curve.target]]
            xs = [p.experts for p in curve.points]
            plt.plot(xs, [p.epi.median for p in curve.points], label=f"EPI {curve.target}", color=c, marker="hd")
            half = [(p.epi.hi - p.epi.lo) / 2 for p in curve.points]
            if any(half):
                plt.error(xs, [p.epi.median for p in curve.points], yerr=half, color=c)
            acc = [p.accuracy.median * 100 if p.accuracy is not None else None for p in curve.points]
            if acc and all(a is not None for a in acc):
                plt.plot(xs, acc, yside="right", color=c, marker="·")
                acc_seen += [a for a in acc if a is not None]
            for depth, tag in ((curve.epi_optimal, "E"), (curve.accuracy_optimal, "A")):
                if depth is not None:
                    p = next((p for p in curve.points if p.experts == depth), None)
                    if p is not None:
                        plt.text(tag, depth, p.epi.median, color=c, style="bold")
        if acc_seen:
            # Accuracy is a percentage: the axis never runs past 0..100 %, yet keeps a few points of
            # margin so the 1-point differences that decide the accuracy-optimal depth stay visible.
            plt.ylim(max(0.0, min(acc_seen) - 5), min(100.0, max(acc_seen) + 5), yside="right")
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
