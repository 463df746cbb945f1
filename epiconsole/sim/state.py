"""The simulated lab's shared state: what the meter, the SSH servers and the API all see.

One :class:`SimLab` per simulated lab. The simulated machines change it the way the real ones would
change the world (starting ``dllama-api`` loads the model on every node; a request keeps all four nodes
busy; setting the governor writes the node's sysfs value) and read it back (the meter reads each node's
electrical state, ``vcgencmd`` reads temperature and throttling). Fault switches are live: tests and the
``epiconsole sim`` command flip them while the lab runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, fields

from epiconsole.config import LabConfig, SimFaults
from epiconsole.sim.clock import SimClock
from epiconsole.sim.physics import Deployed, Electrical, Physics

#: vcgencmd get_throttled bits (current state; the same bits << 16 are "has occurred since boot").
UNDER_VOLTAGE = 0x1
FREQ_CAPPED = 0x2
THROTTLED = 0x4
SOFT_TEMP_LIMIT = 0x8
SOFT_TEMP_LIMIT_C = 80.0


@dataclass
class Faults:
    """Live fault switches (initialised from ``[sim.faults]``)."""

    garbage_fraction: float = 0.0
    lost_line_fraction: float = 0.0
    meter_unplugged: bool = False
    meter_reboot_requested: bool = False
    node_down: set[str] = field(default_factory=set)
    node_throttled: set[str] = field(default_factory=set)
    hot_ambient: bool = False
    api_fail_fraction: float = 0.0
    api_delay_s: float = 0.0

    @classmethod
    def from_config(cls, f: SimFaults) -> Faults:
        return cls(
            garbage_fraction=f.garbage_fraction,
            lost_line_fraction=f.lost_line_fraction,
            node_down={f.node_down} if f.node_down else set(),
            node_throttled={f.node_throttled} if f.node_throttled else set(),
            hot_ambient=f.hot_ambient,
            api_fail_fraction=f.api_fail_fraction,
            api_delay_s=f.api_delay_s,
        )

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = sorted(v) if isinstance(v, set) else v
        return out


@dataclass
class NodeState:
    name: str
    index: int
    #: Real Pi OS boots with the ondemand governor; the engine must set ``performance``.
    governor: str = "ondemand"
    worker_running: bool = False
    root_running: bool = False
    throttled_since: int = 0
    temp_c: float = 45.0
    temp_t: float = 0.0
    arm_hz: int = 2_400_000_000
    kernel: str = "6.6.51+rpt-rpi-2712"


class SimLab:
    """Shared state of one simulated lab (in virtual time, see :mod:`epiconsole.sim.clock`)."""

    def __init__(self, cfg: LabConfig, clock: SimClock | None = None) -> None:
        self.cfg = cfg
        self.clock = clock or SimClock(cfg.sim.time_scale)
        self.physics = Physics(cfg.sim.seed)
        self.faults = Faults.from_config(cfg.sim.faults)
        self.quantize_w = cfg.sim.quantize_w
        self.nodes = {name: NodeState(name, i, temp_c=self.ambient_c() + 23.0) for i, name in enumerate(cfg.cluster.nodes)}
        #: What the root serves while dllama-api runs (None when stopped).
        self.deployed: Deployed | None = None
        self._busy = 0

    # -- environment -----------------------------------------------------------------------------

    def ambient_c(self) -> float:
        p = self.physics.p
        return p.hot_ambient_c if self.faults.hot_ambient else p.ambient_c

    def node(self, name: str) -> NodeState:
        return self.nodes[name]

    def is_up(self, name: str) -> bool:
        return name not in self.faults.node_down

    @property
    def busy(self) -> bool:
        return self._busy > 0

    def loaded(self) -> bool:
        """Every node holds its weight slices while the root's API runs."""
        return self.deployed is not None

    # -- per node --------------------------------------------------------------------------------

    def temperature(self, name: str) -> float:
        n = self.nodes[name]
        now = self.clock.now()
        n.temp_c = self.physics.relax_temperature(n.temp_c, self.ambient_c(), self.busy, now - n.temp_t)
        n.temp_t = now
        return n.temp_c

    def throttled(self, name: str) -> int:
        """The value ``vcgencmd get_throttled`` prints for the node."""
        now = 0
        if name in self.faults.node_throttled:
            now |= FREQ_CAPPED | THROTTLED
        if self.temperature(name) >= SOFT_TEMP_LIMIT_C:
            now |= SOFT_TEMP_LIMIT
        n = self.nodes[name]
        n.throttled_since |= now << 16
        return now | n.throttled_since

    def arm_clock_hz(self, name: str) -> int:
        n = self.nodes[name]
        if self.throttled(name) & (FREQ_CAPPED | THROTTLED):
            return 1_500_000_000
        return n.arm_hz if n.governor == "performance" or self.busy else 1_500_000_000

    def electrical(self, channel: int, tick: int) -> Electrical | None:
        """Readings of the meter channel wired to a node at a meter tick; None for an unmapped channel."""
        name = self.cfg.meter.channels.get(str(channel))
        if name is None or name not in self.nodes:
            return None
        idx = self.nodes[name].index
        return self.physics.electrical(idx, tick, self.busy, self.loaded(), self.deployed, self.quantize_w)

    # -- inference -------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def inference(self, prompt_tokens: int, completion_tokens: int) -> AsyncIterator[float]:
        """Keep the whole cluster busy for as long as the request takes (virtual seconds yielded)."""
        seconds = self.physics.inference_seconds(self.deployed, prompt_tokens, completion_tokens)
        for n in self.nodes:
            self.temperature(n)  # settle the idle stretch before load starts
        self._busy += 1
        try:
            yield seconds
            await self.clock.sleep(seconds)
        finally:
            for n in self.nodes:
                self.temperature(n)
            self._busy -= 1

