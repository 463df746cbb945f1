"""The console app: modes for the five top-level screens, remappable bindings, themes, and the
acquisition loop that reads the ledger and the live state at a fixed rate and hands immutable
snapshots to the visible screen.

Acquisition and drawing are separate: :meth:`EpiConsoleApp._poll_loop` reads at ``poll_hz`` (the
results table every ``results_every`` polls) and posts a :class:`StateUpdated` message that can
replace a stale queued one, so a slow terminal never builds a backlog; only the visible screen
redraws, and charts redraw only when their data changed.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterable

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.message import Message
from textual.screen import Screen

from epiconsole.errors import UserError
from screens.confirm import ConfirmScreen
from screens.controllers import fmt
from screens.controllers.commands import Commander, CommandOutcome, CommandRequest
from screens.controllers.curves import AnalysisCache, CurvesController
from screens.controllers.dashboard import DashboardController
from screens.controllers.log import LogController
from screens.controllers.matrix import MatrixController
from screens.controllers.nodes import NodesController
from screens.controllers.source import DataSource, LabState, read_state
from screens.dashboard import DashboardScreen
from screens.options import ConsoleOptions
from themes import BASE_TCSS, DEFAULT_THEME, builtin_themes, load_user_themes

#: What the top bar says while the service this console started is coming up.
STARTING = "starting the lab service…"
#: What it says when no lab service has ever written this ledger (a viewer waits for one).
WAITING = "waiting for a lab service (start `epiconsole` or `epiconsole service`)"
MODE_TITLES = {"dashboard": "Dashboard", "matrix": "Matrix", "curves": "Curves", "nodes": "Nodes", "log": "Log"}


#: Every screen class with bindings (module in ``screens``, class name), for the keymap check and help.
SCREEN_CLASSES = (("dashboard", "DashboardScreen"), ("matrix", "MatrixScreen"), ("curves", "CurvesScreen"),
                  ("nodes", "NodesScreen"), ("log", "LogScreen"), ("matrix", "MatrixDetailScreen"))


def _screen(module: str, cls: str) -> Screen:
    import importlib

    return getattr(importlib.import_module(f"screens.{module}"), cls)()


class StateUpdated(Message):
    """A new :class:`LabState`; a newer one replaces an older one still in the queue."""

    def __init__(self, state: LabState) -> None:
        super().__init__()
        self.state = state

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, StateUpdated)


class EpiConsoleApp(App[None]):
    """Mission control for the EPI lab. Build with :func:`make_app`."""

    TITLE = "epiconsole"
    CSS_PATH = str(BASE_TCSS)
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (110, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (34, "-tall")]

    BINDINGS = [
        Binding("d", "switch_mode('dashboard')", "Dashboard", id="dashboard", tooltip="show the Dashboard"),
        Binding("m", "switch_mode('matrix')", "Matrix", id="matrix", tooltip="show the Matrix"),
        Binding("c", "switch_mode('curves')", "Curves", id="curves", tooltip="show the Curves"),
        Binding("n", "switch_mode('nodes')", "Nodes", id="nodes", tooltip="show the Nodes"),
        Binding("l", "switch_mode('log')", "Log", id="log", tooltip="show the Log"),
        Binding("question_mark", "help", "Help", id="help", key_display="?", tooltip="this help"),
        Binding("t", "cycle_theme", "Theme", id="theme", show=False, tooltip="next theme (dark, daylight, yours)"),
        Binding("q", "quit", "Quit", id="quit", tooltip="quit this console (a running matrix goes on)"),
    ]

    #: Only the dashboard loads at start; the other screens (and plotext) load when first shown.
    MODES = {
        "dashboard": DashboardScreen,
        "matrix": lambda: _screen("matrix", "MatrixScreen"),
        "curves": lambda: _screen("curves", "CurvesScreen"),
        "nodes": lambda: _screen("nodes", "NodesScreen"),
        "log": lambda: _screen("log", "LogScreen"),
    }

    def __init__(self, options: ConsoleOptions) -> None:
        super().__init__()
        self.options = options
        self.theme_names: list[str] = []
        for theme in builtin_themes():
            self.register_theme(theme)
            self.theme_names.append(theme.name)
        if options.user_theme_dir is not None:
            for theme in load_user_themes(options.user_theme_dir):
                self.register_theme(theme)
                self.theme_names.append(theme.name)
        if options.theme not in self.available_themes:
            raise UserError(
                f"Unknown theme {options.theme!r} in [ui] theme: choose one of {', '.join(self.theme_names)} "
                "or add <config dir>/themes/NAME.toml."
            )
        self.theme = options.theme
        if options.keys:
            known = {b.id for b in self._all_bindings()}
            unknown = sorted(set(options.keys) - known)
            if unknown:
                raise UserError(f"Unknown action {unknown[0]!r} in [ui] keys: use one of {', '.join(sorted(known))}.")
            self.set_keymap(dict(options.keys))
        if not options.animate:
            self.animation_level = "none"
        self.source: DataSource | None = None
        self.commander: Commander | None = None
        self.state = LabState()
        self.problem = ""
        self.dashboard_ctl = DashboardController(options.node_order, options.temp_max_c)
        analysis = AnalysisCache(options.tolerance_pts)  # one analysis per results table, for both screens
        self.matrix_ctl = MatrixController(analysis, options.planned, options.plan_name)
        self.curves_ctl = CurvesController(options.tolerance_pts, analysis)
        self.nodes_ctl = NodesController(options.root)
        self.log_ctl = LogController()
        self.last_outcome: CommandOutcome | None = None
        self._posted: LabState | None = None
        self._service_seen = False
        self._posted_at = -1e9
        self._polls = 0

    # ------------------------------------------------------------------------------ bindings

    def _all_bindings(self) -> list[Binding]:
        """Every binding with an id, app and screens (for the keymap check, help and the palette)."""
        import importlib

        out = list(self.BINDINGS)  # type: ignore[arg-type]
        for module, cls in SCREEN_CLASSES:
            out += list(getattr(importlib.import_module(f"screens.{module}"), cls).BINDINGS)
        return [b for b in out if isinstance(b, Binding) and b.id]

    def key_for(self, binding_id: str, default: str) -> str:
        """The key a binding id is bound to now (after the user's keymap)."""
        return self._keymap.get(binding_id, default).split(",")[0]

    # ------------------------------------------------------------------------------- lifecycle

    def on_mount(self) -> None:
        self.switch_mode("dashboard")
        if self.options.banner:
            self.notify(self.options.banner, timeout=6)
        # Acquisition (and the ledger's imports) start after the first frame is on screen.
        self.call_after_refresh(self._start_acquisition)

    def _start_acquisition(self) -> None:
        self._make_source()
        if self.options.poll_hz > 0:
            self.run_worker(self._poll_loop(), name="poll", group="acquisition", exclusive=True)

    def _make_source(self) -> DataSource:
        if self.source is None:
            self.source = self.options.source_factory()
            self.commander = Commander(self.source, allow_control=self.options.allow_control)
        return self.source

    async def on_unmount(self) -> None:
        if self.source is not None:
            await self.source.close()

    async def open_source(self) -> DataSource:
        source = self._make_source()
        await source.open()
        return source

    async def refresh_data(self, with_results: bool = True) -> LabState:
        """Read the lab's state once and show it (the poll loop calls this; tests call it by hand)."""
        source = await self.open_source()
        previous = self._posted
        state = await read_state(source, previous, with_results=with_results, clock=self.options.clock)
        new_events = await self.log_ctl.poll(source)
        now = time.monotonic()
        unchanged = (
            previous is not None
            and state.live == previous.live
            and state.campaign == previous.campaign
            and state.results == previous.results
            and not new_events
        )
        # Polling is faster than the service publishes: redraw only for news, but at least once a second
        # (ages and "service not answering" depend on the clock, not on news).
        if not unchanged or now - self._posted_at >= 1.0:
            self._posted, self._posted_at = state, now
            self.post_message(StateUpdated(state))
        return state

    async def _poll_loop(self) -> None:
        period = 1.0 / self.options.poll_hz
        while True:
            started = time.monotonic()
            try:
                state = await self.refresh_data(with_results=self._polls % self.options.results_every == 0)
                problem = self._service_problem(state)
            except (UserError, sqlite3.Error, OSError, ValueError) as exc:
                # A missing or locked ledger (or a live row caught mid-write: bad JSON) is a visible state,
                # never a crash; keep trying.
                problem = self._service_problem(None) or f"ledger unreadable: {exc}"[:120]
            if problem != self.problem:
                self.problem = problem
                self._render_visible()
            self._polls += 1
            await asyncio.sleep(max(0.02, period - (time.monotonic() - started)))

    def _service_problem(self, state: LabState | None) -> str:
        """What the top bar must say about the lab service: coming up, why it did not, or that it stopped
        answering (the figures on screen are then its last, not live)."""
        child = self.options.service_child
        if child is not None:
            failure = child.failure()
            if failure:
                return failure
            if not self._service_seen:
                if state is not None and state.live.service.alive(self.options.clock()):
                    self._service_seen = True
                elif time.monotonic() - child.started > child.start_timeout_s:
                    return f"the lab service has not come up in {child.start_timeout_s:.0f} s; see {child.log_path}"
                else:
                    return STARTING
        if state is None:
            return ""
        svc = state.live.service
        if not svc.pid:
            return WAITING
        if not svc.alive(self.options.clock()):
            return f"NOT LIVE: lab service silent since {fmt.clock(svc.heartbeat)}"
        return ""

    def on_state_updated(self, message: StateUpdated) -> None:
        self.state = message.state
        self.nodes_ctl.observe(message.state.live)
        self._render_visible()

    def _render_visible(self) -> None:
        """Redraw the visible screen (and the mode's base screen under a modal)."""
        if not self.is_running:
            return  # shutting down: widgets are being removed
        screens: list[Screen] = [self.screen]
        try:
            base = self.screen_stack[0]
            if base is not self.screen:
                screens.append(base)
        except IndexError:
            pass
        with self.batch_update():
            for screen in screens:
                render = getattr(screen, "render_state", None)
                if render is None or not screen.is_mounted or not getattr(screen, "ready", True):
                    continue
                try:
                    render()
                except NoMatches:
                    # A state that arrives while the app shuts down finds the screen's widgets gone.
                    if self.is_running:
                        raise

    # --------------------------------------------------------------------------------- actions

    def action_help(self) -> None:
        from screens.help import HelpScreen

        self.push_screen(HelpScreen())

    def action_cycle_theme(self) -> None:
        names = self.theme_names
        i = names.index(self.theme) if self.theme in names else -1
        self.theme = names[(i + 1) % len(names)]
        self.notify(f"theme: {self.theme}", timeout=2)
        self._render_visible()  # badges and charts take their colours from the theme at draw time

    def lab_command(self, req: CommandRequest) -> None:
        """Ask (for destructive commands), then send ``req`` to the lab service in a worker."""
        self._make_source()
        assert self.commander is not None
        refused = self.commander.refusal(req)
        if refused:
            self.notify(refused, severity="warning")
            return
        if req.destructive:
            def confirmed(ok: bool | None) -> None:
                if ok:
                    self._send(req)

            self.push_screen(ConfirmScreen(req.describe()), confirmed)
        else:
            self._send(req)

    def _send(self, req: CommandRequest) -> None:
        self.run_worker(self._send_async(req), name=f"command:{req.verb}", group="commands")

    async def _send_async(self, req: CommandRequest) -> None:
        assert self.commander is not None
        try:
            outcome = await self.commander.send(req)
        except (sqlite3.Error, OSError) as exc:
            outcome = CommandOutcome(False, f"could not queue '{req.verb}': {exc}")
        self.last_outcome = outcome
        severity = {True: "information", None: "warning", False: "error"}[outcome.ok]
        self.notify(outcome.message, severity=severity, timeout=5)  # type: ignore[arg-type]

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """The command palette lists every console action, then Textual's own."""
        for mode, title in MODE_TITLES.items():
            yield SystemCommand(f"Show {title}", f"Switch to the {title} screen", lambda m=mode: self.switch_mode(m))
        yield SystemCommand("Help", "Keys and screens", self.action_help)
        yield SystemCommand("Next theme", "Cycle the console themes", self.action_cycle_theme)
        for verb, title in (("start", "Start the matrix"), ("pause", "Pause the run"), ("resume", "Resume the run"),
                            ("abort", "Abort the run")):
            yield SystemCommand(title, f"Send '{verb}' to the lab service",
                                lambda v=verb: self.lab_command(CommandRequest(v)))
        # Actions on the current selection (skip/retry a configuration, node governor/restart).
        extra = getattr(screen, "palette_commands", None)
        if extra is not None:
            for title, help_text, callback in extra():
                yield SystemCommand(title, help_text, callback)
        yield from super().get_system_commands(screen)

    # ------------------------------------------------------------------------------- rendering

    @property
    def simulated(self) -> bool:
        live = self.state.live
        return (self.options.simulated or live.service.simulated
                or bool(self.state.campaign and self.state.campaign.simulated))


def make_app(options: ConsoleOptions) -> EpiConsoleApp:
    """The one factory the CLI, the web view and the tests use."""
    return EpiConsoleApp(options)


__all__ = ["DEFAULT_THEME", "EpiConsoleApp", "StateUpdated", "make_app"]
