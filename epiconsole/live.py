"""Live state: what the lab service publishes a few times per second for every viewer.

The service is the only process that talks to the hardware. Viewers (the TUI on the display, TUIs over
SSH, the web view, ``epiconsole status``) read this state from the ledger (``Ledger.set_live`` /
``Ledger.get_live``) and never from the hardware. It is a plain, JSON-able snapshot: each section is a
frozen dataclass with ``to_dict``/``from_dict``, so writer and readers share one definition.

Sections (ledger live keys):

``service``  who is running the lab: pid, start time, config path, simulated flag, heartbeat.
``meter``    connection, rate, counters, clock-fit quality.
``nodes``    per node: latest electrical figures, 10 s mean, health from SSH, API reachability.
``run``      the engine: state, current configuration/repetition/stage, progress, ETA, window energy,
             live J/token, tripped suspender.
``ambient``  room temperature.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_type_hints

RunState = Literal["idle", "running", "pausing", "paused", "suspended", "aborting", "finished", "failed", "aborted"]

#: A service whose heartbeat is older than this is considered gone.
HEARTBEAT_STALE_S = 5.0

T = TypeVar("T")


class _Section:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any] | None) -> T:
        """Build from a dict, ignoring unknown keys (an older viewer reading a newer service)."""
        if not data:
            return cls()
        hints = get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name not in data:
                continue
            value = data[f.name]
            tp = hints[f.name]
            if f.name == "nodes" and isinstance(value, dict):
                value = {k: NodeLive.from_dict(v) for k, v in value.items()}
            elif isinstance(tp, type) and issubclass(tp, tuple) and isinstance(value, list):
                value = tuple(value)
            elif getattr(tp, "__origin__", None) is tuple and isinstance(value, list):
                value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
            kwargs[f.name] = value
        return cls(**kwargs)


@dataclass(frozen=True)
class ServiceLive(_Section):
    pid: int = 0
    host: str = ""
    started: float = 0.0
    heartbeat: float = 0.0
    config_path: str = ""
    lab_name: str = ""
    simulated: bool = False
    version: str = ""

    def alive(self, now: float | None = None) -> bool:
        return self.pid > 0 and (now if now is not None else time.time()) - self.heartbeat < HEARTBEAT_STALE_S


@dataclass(frozen=True)
class MeterLive(_Section):
    connected: bool = False
    port: str = ""
    rate_hz: float = 0.0
    firmware: str = ""
    serial: str = ""
    cal_date: str = ""
    uncertainty_pct: float = 0.0
    good_lines: int = 0
    bad_lines: int = 0
    lost_lines: int = 0
    reboots: int = 0
    reconnects: int = 0
    fit_residual_ms: float = 0.0
    last_sample: float = 0.0


@dataclass(frozen=True)
class NodeLive(_Section):
    name: str = ""
    channel: int = -1
    # electrical, from the meter (None until a sample arrived)
    W: float | None = None
    W_mean_10s: float | None = None
    V: float | None = None
    A: float | None = None
    PF: float | None = None
    Wh: float | None = None
    #: Recent watts for sparklines: (host time, watts) pairs, at most a few hundred, oldest first.
    recent: tuple[tuple[float, float], ...] = ()
    # health, from SSH
    ssh_ok: bool | None = None
    ssh_error: str = ""
    temp_c: float | None = None
    arm_hz: int | None = None
    governor: str = ""
    load1: float | None = None
    throttled_now: tuple[str, ...] = ()
    throttled_since: tuple[str, ...] = ()
    health_time: float = 0.0
    role: str = ""  # "root" or "worker"
    process_running: bool | None = None


@dataclass(frozen=True)
class NodesLive(_Section):
    nodes: dict[str, NodeLive] = field(default_factory=dict)
    api_ok: bool | None = None
    api_model: str = ""
    cluster_W: float | None = None


@dataclass(frozen=True)
class RunLive(_Section):
    state: RunState = "idle"
    campaign_id: int | None = None
    plan_name: str = ""
    config_id: str = ""
    repetition: int = 0
    stage: str = ""
    stage_started: float = 0.0
    #: Expected end of the current stage (host time) when known, for a countdown.
    stage_eta: float = 0.0
    #: 0..1 within the current stage when known (benchmark requests done / total, surgery tensors).
    stage_progress: float | None = None
    trials_done: int = 0
    trials_total: int = 0
    eta_s: float | None = None
    window_start: float = 0.0
    window_joules: float | None = None
    window_tokens: int = 0
    live_jpt: float | None = None
    suspender: str = ""
    suspended_since: float = 0.0
    message: str = ""


@dataclass(frozen=True)
class AmbientLive(_Section):
    temp_c: float | None = None
    time: float = 0.0
    in_band: bool | None = None


@dataclass(frozen=True)
class LiveSnapshot:
    """Everything a viewer shows live, read in one go."""

    service: ServiceLive = field(default_factory=ServiceLive)
    meter: MeterLive = field(default_factory=MeterLive)
    nodes: NodesLive = field(default_factory=NodesLive)
    run: RunLive = field(default_factory=RunLive)
    ambient: AmbientLive = field(default_factory=AmbientLive)

    KEYS = ("service", "meter", "nodes", "run", "ambient")

    @classmethod
    def from_live(cls, live: dict[str, Any]) -> LiveSnapshot:
        """From ``Ledger.get_live()`` (key -> dict, or key -> (dict, updated) pairs)."""

        def section(key: str) -> dict[str, Any] | None:
            v = live.get(key)
            if isinstance(v, tuple | list) and v and isinstance(v[0], dict):
                return v[0]
            if isinstance(v, dict) and "value" in v and isinstance(v["value"], dict):
                return v["value"]
            return v

        return cls(
            service=ServiceLive.from_dict(section("service")),
            meter=MeterLive.from_dict(section("meter")),
            nodes=NodesLive.from_dict(section("nodes")),
            run=RunLive.from_dict(section("run")),
            ambient=AmbientLive.from_dict(section("ambient")),
        )

    def to_live(self) -> dict[str, dict[str, Any]]:
        return {k: getattr(self, k).to_dict() for k in self.KEYS}


#: Commands viewers put in the ledger for the service (``Ledger.put_command(verb, args)``).
COMMANDS = {
    "start": "start (or resume after a crash) the campaign; args: only (list of ids), reps (int), resume (bool)",
    "pause": "pause at the next stage boundary",
    "resume": "resume a paused campaign",
    "abort": "abort the campaign (exit_status=aborted); the current measurement is discarded",
    "skip": "skip a configuration; args: config_id",
    "retry": "run a failed or invalid configuration again; args: config_id",
    "set_governor": "set a node's cpufreq governor; args: node, governor",
    "restart_worker": "restart the dllama worker on a node; args: node",
    "restart_root": "restart the root node's dllama-api",
}
