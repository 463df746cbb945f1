"""Widgets shared by the screens: the top bar with the SIMULATED badge and the per-node tile."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widget import Widget
from textual.widgets import Digits, Static

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


def pack_parts(parts: list[str], width: int, sep: str = " · ") -> str:
    """Join ``parts`` with ``sep``, breaking lines between parts (never inside one) to fit ``width``.

    A status line that wraps at a space can split "bad" from its count; breaking between parts keeps
    every figure next to its label on a narrow terminal.
    """
    lines: list[str] = []
    for part in parts:
        if lines and len(lines[-1]) + len(sep) + len(part) <= width:
            lines[-1] += sep + part
        else:
            lines.append(part)
    return "\n".join(lines)


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
            calm = problem.startswith(("starting ", "waiting "))
            t.append(f" {problem} ", style="bold reverse" if calm else "bold reverse red")
            t.append(" ")
        t.append(f"run: {run_state}", style="bold")
        if lab:
            t.append(f" · {lab}")
        show_text(self, t)


#: Eighth blocks, empty to full: a column's height in eighths of a row.
BLOCKS = " ▁▂▃▄▅▆▇█"


def spark_rows(data: tuple[float | None, ...], ceiling: float, width: int, height: int) -> list[str]:
    """Rows (top first) of a bar sparkline scaled from 0 W to ``ceiling``, ``width`` columns wide.

    Each column shows the highest bin that falls into it (a short inference burst stays visible when
    the sparkline is narrower than its data); columns with no data yet are blank, never zero-height
    bars, so "no sample" and "0 W" look different.
    """
    if width <= 0 or height <= 0:
        return []
    n = len(data)
    ceiling = ceiling if ceiling > 0 else 1.0
    eighths: list[int | None] = []
    for c in range(width):
        lo = c * n // width
        vals = [w for w in data[lo:max(lo + 1, (c + 1) * n // width)] if w is not None]
        # A reading rounds to at least one eighth: 0 W (a bar's foot) still differs from "no sample".
        eighths.append(max(1, round(max(0.0, max(vals)) / ceiling * height * 8)) if vals else None)
    rows = []
    for r in range(height - 1, -1, -1):  # r = rows of blocks below this one
        line = []
        for e in eighths:
            line.append(" " if e is None else BLOCKS[max(0, min(8, e - 8 * r))])
        rows.append("".join(line))
    return rows


class PowerSpark(Widget):
    """A node's recent watts as bars on a fixed 0 W-based scale (idle and load read apart at a glance;
    an autoscaled sparkline would blow a 0.3 W wobble up into a cliff)."""

    DEFAULT_CSS = """
    PowerSpark { height: 1fr; min-height: 1; max-height: 20; }
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.data: tuple[float | None, ...] = ()
        self.ceiling = 12.0

    def set_data(self, data: tuple[float | None, ...], ceiling: float) -> None:
        if (data, ceiling) != (self.data, self.ceiling):
            self.data, self.ceiling = data, ceiling
            self.refresh()

    def render(self) -> Text:
        rows = spark_rows(self.data, self.ceiling, self.size.width, self.size.height)
        return Text("\n".join(rows), no_wrap=True, overflow="crop")


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
    NodeTile PowerSpark { margin-top: 1; }
    NodeTile .spark-caption { height: 1; color: $foreground 60%; text-wrap: nowrap; text-overflow: ellipsis; }
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
        yield PowerSpark()
        yield Static("", classes="spark-caption")

    def show(self, v: NodeTileView, stale: str = "") -> None:
        """Show ``v``; ``stale`` (why the figures are not live) goes on the border, the figures are dashes."""
        import time

        title = f"{v.name} · {v.role}"
        if self.border_title != title:
            self.border_title = title
        subtitle = v.health.upper() if v.health != "ok" else ""
        if stale:
            subtitle = f"{subtitle} · NOT LIVE" if subtitle else "NOT LIVE"
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
        spark = self.query_one(PowerSpark)
        if spark.data and now - self._spark_at < self.SPARK_INTERVAL_S:
            return
        self._spark_at = now
        spark.set_data(v.spark, v.spark_ceiling)
        seen = [w for w in v.spark if w is not None]
        # The range first: on a narrow tile the ellipsis cuts the scale note, never the figures.
        caption = (f"{min(seen):.1f}–{max(seen):.1f} W in 3 min · scale 0–{v.spark_ceiling:.0f} W" if seen
                   else "no recent samples")
        show_text(self.query_one(".spark-caption", Static), caption)
