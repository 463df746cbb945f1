"""Shared helpers for the benchmark scripts: synthetic meter traces and reporting.

Each bench prints its figures, then one JSON line, and exits 1 when a target is missed.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Any

import numpy as np

from epiconsole.ledger import SampleBlock

T0 = 1_780_000_000.0  # a fixed epoch so runs are comparable


def machine() -> str:
    return f"{os.cpu_count()} cores, python {platform.python_version()}"


def synthetic_block(
    n: int, rate_hz: float, *, channels: int = 4, t_start: float = T0, seed: int = 1
) -> SampleBlock:
    """``n`` ticks of a plausible 4-node Pi cluster at the wall: 3-12 W with load steps and noise."""
    rng = np.random.default_rng(seed)
    dt = 1.0 / rate_hz
    t = t_start + np.arange(n) * dt
    # Load alternates between idle and inference every ~minute, per node with its own phase.
    phase = rng.uniform(0, 60, channels)
    load = ((t[:, None] - t_start + phase) % 120.0) < 60.0
    W = np.where(load, 10.5, 3.2) + rng.normal(0, 0.15, (n, channels))
    V = 229.8 + rng.normal(0, 0.4, (n, 1)) + rng.normal(0, 0.05, (n, channels))
    PF = np.where(load, 0.93, 0.62) + rng.normal(0, 0.005, (n, channels))
    A = W / (V * PF)
    VAR = W * np.tan(np.arccos(np.clip(PF, -1, 1)))
    Hz = 50.0 + rng.normal(0, 0.01, (n, 1)).repeat(channels, axis=1)
    Wh = 12.0 + np.cumsum(W, axis=0) * dt / 3600.0
    seq = np.arange(n)
    return SampleBlock.from_arrays(
        t,
        seq=seq,
        ms=(seq * dt * 1000).astype(np.int64),
        st=np.zeros(n),
        V=V,
        A=A,
        W=W,
        VAR=VAR,
        PF=PF,
        Hz=Hz,
        Wh=Wh,
    )


def tick_tuples(block: SampleBlock) -> list[tuple[float, int, int, int, list[tuple[float, ...]]]]:
    """The block as per-tick values, the way the service receives them from the meter driver."""
    q = np.stack([block.V, block.A, block.W, block.VAR, block.PF, block.Hz, block.Wh], axis=2).tolist()
    return [
        (float(t), int(s), int(m), int(b), [tuple(ch) for ch in q[i]])
        for i, (t, s, m, b) in enumerate(
            zip(block.t.tolist(), block.seq.tolist(), block.ms.tolist(), block.st.tolist(), strict=True)
        )
    ]


class Report:
    """Collects figures and target checks; :meth:`finish` prints them and returns the exit code."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.figures: dict[str, Any] = {}
        self.failed: list[str] = []
        self.started = time.perf_counter()

    def figure(self, key: str, value: Any, label: str, unit: str = "") -> None:
        self.figures[key] = value
        shown = (
            f"{value:,.3f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else value
        )
        print(f"  {label:<52} {shown} {unit}".rstrip())

    def target(self, what: str, ok: bool) -> None:
        print(f"  target {'met   ' if ok else 'MISSED'} {what}")
        if not ok:
            self.failed.append(what)

    def finish(self) -> int:
        self.figures["machine"] = machine()
        self.figures["elapsed_s"] = round(time.perf_counter() - self.started, 2)
        self.figures["targets_missed"] = self.failed
        print(json.dumps({"bench": self.name, **self.figures}, sort_keys=True))
        return 1 if self.failed else 0


def header(title: str) -> None:
    print(f"{title}  ({machine()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})")
    sys.stdout.flush()
