"""What a console instance is configured with (one value, so the CLI, the web view and the tests build
the app the same way)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from screens.controllers.matrix import PlannedConfig
from screens.controllers.source import DataSource


class ServiceChild(Protocol):
    """A lab service this console started and is waiting for (see ``epiconsole.commands.tui``)."""

    #: ``time.monotonic()`` when it was started, and how long it may take to publish a heartbeat.
    started: float
    start_timeout_s: float
    log_path: Path

    def failure(self) -> str | None:
        """Why it stopped (one sentence), or None while it runs. Must not block."""
        ...


@dataclass(frozen=True)
class ConsoleOptions:
    #: Builds the data source inside the app's event loop (aiosqlite connections belong to a loop).
    source_factory: Callable[[], DataSource]
    node_order: tuple[str, ...] = ("pi0", "pi1", "pi2", "pi3")
    root: str = "pi0"
    #: Meter channel id (string) -> node name, for the detail view's traces.
    channels: Mapping[str, str] = field(default_factory=lambda: {str(i): f"pi{i}" for i in range(4)})
    temp_max_c: float = 80.0
    tolerance_pts: float = 1.0
    allow_control: bool = True
    theme: str = "epi-dark"
    #: Binding id -> key (``[ui] keys`` in the lab config).
    keys: Mapping[str, str] = field(default_factory=dict)
    user_theme_dir: Path | None = None
    #: True when this console attached to a service another process runs.
    attached: bool = False
    #: Live state poll rate; 0 turns polling off (snapshot tests refresh by hand).
    poll_hz: float = 12.0
    #: The results table changes at stage boundaries only: read it every this many polls.
    results_every: int = 5
    clock: Callable[[], float] = time.time
    #: Off in snapshot tests: no cursor blink, no animations.
    animate: bool = True
    #: A message shown once at start (e.g. "started the lab service, pid 1234").
    banner: str = ""
    #: The service this console started, while the console waits for its first heartbeat.
    service_child: ServiceChild | None = None
    #: The lab config's plan: the Matrix lists it as pending rows before the first campaign.
    planned: tuple[PlannedConfig, ...] = ()
    plan_name: str = ""
    #: The lab config is the simulated lab: the SIMULATED badge shows even before the service answers.
    simulated: bool = False
