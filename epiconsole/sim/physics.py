"""The simulated lab's physics: a documented, deterministic model of the cluster.

Everything here is a *model*, not a measurement; all values it produces are labelled simulated.

Power (at the wall, per node, the AC side the epi-meter sees)
    A Raspberry Pi 5 draws ~3 W idle and 10-12 W under distributed-llama inference (DESIGN.md §2).
    We model the node's DC draw and convert to wall power through a PSU efficiency curve that is
    worse at light load (``eff = 0.88 - 0.18 * exp(-dc / 4 W)``), the main reason a Pi looks
    disproportionately expensive at idle. Workers holding weights add a little (RAM refresh, busy
    polling). Noise is Gaussian (``noise_w``), deterministic for (seed, node, tick). With
    ``quantize_w`` the W field is rounded to 1 W, like the ATM90E26 mean-power register; the
    energy counter stays fine-grained.

Throughput (Qwen3-30B-A3B, q40 weights, q80 buffers, 4 x Pi 5)
    13.5 generated tokens/s and 42 prompt tokens/s at baseline (in line with distributed-llama's
    published Pi 5 figures for this model). Top-8 routing means the active parameters per token do
    not change when experts are dropped; what changes is the weight footprint, so ``remove`` gains a
    little (0.4 % per dropped expert: smaller slices, better cache and DRAM locality) and draws a little
    less (0.3 % per expert). ``zero`` and ``mask`` keep the footprint and the speed.

Accuracy (composite of MMLU 5-shot, ARC-Challenge 25-shot, HellaSwag 10-shot, generative scoring)
    Baselines 0.76 / 0.82 / 0.70. Losses, in accuracy points, follow the shape of published
    expert-pruning results (Lu et al. 2024, "Not All Experts are Equal"; REAP, 2025; and the
    "5 % pruning breaks the model" zeroing experiments): removing the least-routed experts in all
    layers costs little at first and grows faster than linearly (0.15 * n^1.5 points); zeroing is
    worse than removing because the zeroed expert is still routed to and returns nothing, and early
    layers are more sensitive than late ones (0.6 * n points early, 0.3 * n late); masking loses
    two thirds of what zeroing loses. With these numbers the accuracy-optimal depth (within 1 point
    of baseline) is 3 experts for all layers while EPI is lowest at 5 — the tension the
    console is built to show.

Temperature
    Each node relaxes toward ambient + 23 °C idle, + 40 °C under load, with a 90 s time constant
    (virtual time). Ambient is 22 °C (31 °C with the ``hot_ambient`` fault).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Deployed:
    """What the simulated root node is serving (read from the model file's header)."""

    config_id: str
    model: str = "Qwen3-30B-A3B"
    experts: int = 0
    target: str | None = None
    strategy: str | None = None


@dataclass(frozen=True)
class PhysicsParams:
    idle_dc_w: tuple[float, ...] = (2.45, 2.30, 2.35, 2.30)
    load_dc_w: tuple[float, ...] = (9.90, 9.30, 9.45, 9.25)
    loaded_extra_dc_w: float = 0.25
    noise_w: float = 0.06
    mains_v: float = 229.8
    mains_hz: float = 50.0
    pf_idle: float = 0.55
    pf_load: float = 0.91
    prompt_tps: float = 42.0
    gen_tps: float = 13.5
    ambient_c: float = 22.0
    hot_ambient_c: float = 31.0
    idle_rise_c: float = 23.0
    load_rise_c: float = 40.0
    thermal_tau_s: float = 90.0
    base_accuracy: tuple[tuple[str, float], ...] = (("mmlu", 0.76), ("arc_challenge", 0.82), ("hellaswag", 0.70))
    default_accuracy: float = 0.72


def psu_efficiency(dc_w: float) -> float:
    return 0.88 - 0.18 * math.exp(-dc_w / 4.0)


@dataclass(frozen=True)
class Electrical:
    V: float
    A: float
    W: float
    VAR: float
    PF: float
    Hz: float


class Physics:
    """Pure functions of (seed, configuration, node state, time). No I/O."""

    #: Noise comes from two per-node tables of coprime lengths, so a tick's noise is a cheap lookup
    #: (the meter asks for 4 channels x rate x time-scale readings per second) yet deterministic for
    #: (seed, node, tick) and periodic only after 4093 * 4099 ticks.
    _NOISE_LENGTHS = (4093, 4099)

    def __init__(self, seed: int = 42, params: PhysicsParams | None = None) -> None:
        self.seed = seed
        self.p = params or PhysicsParams()
        self._noise: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _noise_at(self, node: int, tick: int) -> tuple[float, float, float]:
        tables = self._noise.get(node)
        if tables is None:
            rng = np.random.default_rng((self.seed, node))
            tables = tuple(rng.normal(0.0, 1.0 / math.sqrt(2), (n, 3)) for n in self._NOISE_LENGTHS)
            self._noise[node] = tables  # type: ignore[assignment]
        a, b = tables
        row = a[tick % a.shape[0]] + b[tick % b.shape[0]]
        return float(row[0]), float(row[1]), float(row[2])

    # -- cluster performance ---------------------------------------------------------------------

    def speed_factor(self, d: Deployed | None) -> float:
        if d is None or d.experts == 0 or d.strategy != "remove":
            return 1.0
        return 1.0 + 0.004 * d.experts

    def power_factor(self, d: Deployed | None) -> float:
        if d is None or d.experts == 0 or d.strategy != "remove":
            return 1.0
        return 1.0 - 0.003 * d.experts

    def prompt_tps(self, d: Deployed | None) -> float:
        return self.p.prompt_tps * self.speed_factor(d)

    def gen_tps(self, d: Deployed | None) -> float:
        return self.p.gen_tps * self.speed_factor(d)

    def inference_seconds(self, d: Deployed | None, prompt_tokens: int, completion_tokens: int) -> float:
        """Virtual seconds the cluster spends on one request."""
        return prompt_tokens / self.prompt_tps(d) + completion_tokens / self.gen_tps(d)

    # -- accuracy --------------------------------------------------------------------------------

    def accuracy_loss_pts(self, d: Deployed | None) -> float:
        if d is None or d.experts == 0:
            return 0.0
        n = d.experts
        if d.strategy == "remove":
            return 0.15 * n**1.5
        per = {"early": 0.6, "late": 0.3, "all": 1.2}.get(d.target or "all", 1.2)
        if d.strategy == "mask":
            per *= 2 / 3
        return per * n

    def accuracy(self, task: str, d: Deployed | None) -> float:
        """Probability that the simulated model answers an item of ``task`` correctly."""
        base = dict(self.p.base_accuracy)
        # lm-eval subtask names (mmlu_abstract_algebra, arc_challenge_chat, ...) map to their family.
        family = next((k for k in base if task.startswith(k)), None)
        acc = base.get(family, self.p.default_accuracy) if family else self.p.default_accuracy
        return max(0.0, min(1.0, acc - self.accuracy_loss_pts(d) / 100.0))

    # -- power -----------------------------------------------------------------------------------

    def node_dc_w(self, node: int, busy: bool, loaded: bool, d: Deployed | None) -> float:
        p = self.p
        dc = p.load_dc_w[node % len(p.load_dc_w)] * self.power_factor(d) if busy else p.idle_dc_w[node % len(p.idle_dc_w)]
        if loaded and not busy:
            dc += p.loaded_extra_dc_w
        return dc

    def electrical(self, node: int, tick: int, busy: bool, loaded: bool, d: Deployed | None,
                   quantize_w: bool = False) -> Electrical:
        """Wall-side readings for one node at one meter tick (deterministic for seed, node, tick)."""
        p = self.p
        dc = self.node_dc_w(node, busy, loaded, d)
        n0, n1, n2 = self._noise_at(node, tick)
        w = max(0.0, dc / psu_efficiency(dc) + n0 * p.noise_w)
        v = p.mains_v + n1 * p.noise_w * 5
        pf = p.pf_load if busy else p.pf_idle
        va = w / pf
        a = va / v
        var = math.sqrt(max(va * va - w * w, 0.0))
        hz = p.mains_hz + n2 * p.noise_w * 0.05
        shown = float(round(w)) if quantize_w else w
        return Electrical(V=v, A=a, W=shown, VAR=var, PF=pf, Hz=hz)

    def true_watts(self, node: int, busy: bool, loaded: bool, d: Deployed | None) -> float:
        """Noise-free wall power: what an ideal meter would integrate (for test expectations)."""
        dc = self.node_dc_w(node, busy, loaded, d)
        return dc / psu_efficiency(dc)

    # -- temperature -----------------------------------------------------------------------------

    def relax_temperature(self, temp: float, ambient: float, busy: bool, dt: float) -> float:
        target = ambient + (self.p.load_rise_c if busy else self.p.idle_rise_c)
        return target + (temp - target) * math.exp(-max(dt, 0.0) / self.p.thermal_tau_s)
