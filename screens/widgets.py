"""Widgets shared by the screens: the top bar with the SIMULATED badge and the per-node tile."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Digits, Sparkline, Static

from screens.controllers.dashboard import NodeTileView
from screens.controllers.fmt import MISSING


def show_text(widget: Static, content: str | Text) -> None:
    """Update a Static only when its content changed, and without a layout pass.

    Every Static updated per poll has a fixed height in the stylesheet, so its size never depends on
    its text; a layout pass of the whole screen costs tens of milliseconds on a Pi and would run at
    the poll rate otherwise.
    """
    if getattr(widget, "_epi_shown", None) != content:
        widget._epi_shown = content  # type: ignore[attr-defined]
        widget.update(content, layout=False)


def show_digits(widget: Digits, value: str) -> None:
    """Digits has no glyph for the missing mark; a missing reading shows as dashes, never as 0."""
    if value == MISSING:
        value = "--.-"
    if widget.value != value:
        widget.update(value)


class TopBar(Static):
    """One line: app and screen name, lab, badges (SIMULATED, VIEW-ONLY), run state. No clock: the
    screen must be the same for the same lab state (snapshots)."""

    DEFAULT_CSS = """
    TopBar { height: 1; width: 1fr; background: $panel; color: $foreground; text-wrap: nowrap; }
    """

    def show(self, screen_title: str, lab: str, simulated: bool, view_only: bool, run_state: str,
             problem: str, sim_color: str) -> None:
        t = Text(no_wrap=True, overflow="ellipsis")
        t.append(" EPICONSOLE ", style="bold reverse")
        t.append(f" {screen_title} ", style="bold")
        if simulated:
            t.append(" SIMULATED ", style=f"bold reverse {sim_color}")
            t.append(" ")
        if view_only:
            t.append(" VIEW-ONLY ", style="bold reverse")
            t.append(" ")
        if problem:
            # Waiting for a service that is starting is not an error; anything else is.
            t.append(f" {problem} ", style="bold reverse" if problem.startswith("starting ") else "bold reverse red")
            t.append(" ")
        t.append(f"run: {run_state}", style="bold")
        if lab:
            t.append(f" · {lab}")
        show_text(self, t)


class NodeTile(Vertical):
    """A node's live figures: large watts, electrical details, health and a sparkline."""

    DEFAULT_CSS = """
    NodeTile { border: round $node-ok; padding: 0 1; height: 1fr; }
    NodeTile.-warn { border: heavy $node-warn; }
    NodeTile.-fault { border: heavy $node-fault; }
    NodeTile.-unknown { border: round $stage-idle; }
    NodeTile .watts-row { height: 3; }
    NodeTile Digits { width: auto; }
    NodeTile .unit { width: auto; padding: 1 0 0 1; text-style: bold; }
    NodeTile .line { height: 1; text-wrap: nowrap; text-overflow: ellipsis; }
    NodeTile Sparkline { height: 1fr; min-height: 1; max-height: 10; margin-top: 1; }
    NodeTile .spark-caption { height: 1; color: $foreground 60%; }
    """

    #: Sparklines (3 minutes wide) redraw at most once a second: faster adds CPU, not information.
    SPARK_INTERVAL_S = 1.0

    def __init__(self, index: int) -> None:
        super().__init__(id=f"tile-{index}", classes=f"series-{index % 4}")
        self.index = index
        self._spark_at = -1e9

    def compose(self) -> ComposeResult:
        from textual.containers import Horizontal

        with Horizontal(classes="watts-row"):
            yield Digits("--.-", classes="watts")
            yield Static("W", classes="unit")
        yield Static("", classes="line watts-text")
        yield Static("", classes="line mean")
        yield Static("", classes="line elec")
        yield Static("", classes="line health")
        yield Static("", classes="line gov")
        yield Static("", classes="line throttle")
        yield Sparkline([], summary_function=max)
        yield Static("", classes="spark-caption")

    def show(self, v: NodeTileView) -> None:
        import time

        title = f"{v.name} · {v.role}"
        if self.border_title != title:
            self.border_title = title
        subtitle = v.health.upper() if v.health != "ok" else ""
        if self.border_subtitle != subtitle:
            self.border_subtitle = subtitle
        for h in ("warn", "fault", "unknown"):
            self.set_class(v.health == h, f"-{h}")
        show_digits(self.query_one(".watts", Digits), v.watts)
        show_text(self.query_one(".watts-text", Static), f"{v.watts} W   (10 s mean {v.mean_10s})")
        show_text(self.query_one(".mean", Static), f"10 s mean {v.mean_10s}")
        show_text(self.query_one(".elec", Static), f"{v.volts}  {v.amps}  PF {v.pf}")
        show_text(self.query_one(".health", Static), f"{v.temp}  {v.clock}")
        show_text(self.query_one(".gov", Static), f"governor {v.governor}")
        throttle = self.query_one(".throttle", Static)
        show_text(throttle, v.throttle)
        throttle.set_class(v.throttle.startswith(("THROTTLED", "unreachable")), "bad")
        now = time.monotonic()
        spark = self.query_one(Sparkline)
        if spark.data and now - self._spark_at < self.SPARK_INTERVAL_S:
            return
        self._spark_at = now
        data = list(v.spark)
        if spark.data != data:
            spark.data = data
        caption = f"last 3 min  {min(data):.1f}–{max(data):.1f} W" if data else "no recent samples"
        show_text(self.query_one(".spark-caption", Static), caption)
