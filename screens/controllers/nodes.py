"""Nodes controller: per-node SSH/API state, temperature, clock, governor and a throttling history
the controller keeps itself (transitions seen in the live state, bounded)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from epiconsole.live import LiveSnapshot
from screens.controllers import fmt
from screens.controllers.commands import CommandRequest

HISTORY_MAX = 200
#: Run states in which a benchmark request may be in flight on the root's API.
BUSY_RUN_STATES = frozenset({"running", "pausing", "aborting"})
#: Stages during (or just around) which benchmark requests occupy the one-request-at-a-time API.
BUSY_STAGES = frozenset({"stabilize", "benchmark", "calculate", "log"})
GOVERNORS = ("performance", "ondemand", "powersave", "schedutil")


@dataclass(frozen=True)
class NodeRow:
    name: str
    role: str
    ssh: str
    ssh_ok: bool | None
    process: str
    temp: str
    clock: str
    governor: str
    governor_ok: bool
    load: str
    throttled_now: str
    throttled_since: str
    checked: str


@dataclass(frozen=True)
class NodesView:
    rows: tuple[NodeRow, ...]
    api: str
    api_ok: bool | None
    history: tuple[str, ...]


class NodesController:
    def __init__(self, root: str = "") -> None:
        self.root = root
        self._last: dict[str, tuple[str, ...]] = {}
        self._history: deque[str] = deque(maxlen=HISTORY_MAX)

    def observe(self, live: LiveSnapshot) -> None:
        """Record throttling transitions (call once per new live snapshot)."""
        for name, n in live.nodes.nodes.items():
            prev = self._last.get(name)
            if prev is not None and prev != n.throttled_now:
                when = fmt.clock(n.health_time)
                what = ", ".join(n.throttled_now) if n.throttled_now else "cleared"
                self._history.append(f"{when}  {name}  {what}")
            elif prev is None and n.throttled_now:
                self._history.append(f"{fmt.clock(n.health_time)}  {name}  {', '.join(n.throttled_now)}")
            self._last[name] = n.throttled_now

    def view(self, live: LiveSnapshot, node_order: tuple[str, ...] = ()) -> NodesView:
        nodes = live.nodes.nodes
        order = [n for n in node_order if n in nodes] + sorted(n for n in nodes if n not in node_order)
        rows = []
        for name in order:
            n = nodes[name]
            ssh = {True: "ok", False: "DOWN", None: "unknown"}[n.ssh_ok]
            if n.ssh_ok is False and n.ssh_error:
                ssh = f"DOWN: {n.ssh_error}"
            proc = {True: "running", False: "stopped", None: fmt.MISSING}[n.process_running]
            rows.append(
                NodeRow(
                    name=name,
                    role=n.role or fmt.MISSING,
                    ssh=ssh,
                    ssh_ok=n.ssh_ok,
                    process=proc,
                    temp=fmt.num(n.temp_c, 1, "°C"),
                    clock=fmt.ghz(n.arm_hz),
                    governor=n.governor or fmt.MISSING,
                    governor_ok=n.governor == "performance",
                    load=fmt.num(n.load1, 2),
                    throttled_now=", ".join(n.throttled_now) or "no",
                    throttled_since=", ".join(n.throttled_since) or "no",
                    checked=fmt.clock(n.health_time),
                )
            )
        api_ok = live.nodes.api_ok
        api = {True: "answering", False: "NOT answering", None: "unknown"}[api_ok]
        if api_ok is False and live.run.stage in BUSY_STAGES and live.run.state in BUSY_RUN_STATES:
            # dllama-api serves one request at a time: during a benchmark the service's health probe
            # queues behind a benchmark request and times out. That is a busy API, not a dead one (a
            # dead one fails the benchmark stage, which the Matrix and the Log show). The probe's result
            # lags the stage by up to a probe period, so the stages around the benchmark count too.
            api, api_ok = "busy with benchmark requests (health probe not answered)", None
        if live.nodes.api_model:
            api += f" · {live.nodes.api_model}"
        return NodesView(tuple(rows), api, api_ok, tuple(reversed(self._history)))

    def set_governor(self, node: str, governor: str = "performance") -> CommandRequest:
        return CommandRequest("set_governor", {"node": node, "governor": governor})

    def restart(self, node: str) -> CommandRequest:
        role_root = node == self.root
        return CommandRequest("restart_root") if role_root else CommandRequest("restart_worker", {"node": node})
