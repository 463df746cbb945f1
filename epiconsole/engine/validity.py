"""Validity of one repetition (MLPerf style): every failed check is a recorded reason, never dropped.

:func:`judge` is pure: it takes what the calculate stage measured (energy coverage and gaps per node),
what the monitor saw during the window (throttling, governors, ambient) and the benchmark outcome, and
returns the reasons the repetition is invalid (an empty list means valid). Reasons are short sentences
that name the node and the figure, so a reader of the export knows exactly what went wrong.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class NodeEnergy:
    """Energy figures of one node over the window, as the calculate stage measured them."""

    node: str
    joules: float | None
    coverage: float
    longest_gap_s: float
    #: Samples cover both window ends (within the gap limit).
    start_covered: bool
    end_covered: bool


@dataclass(frozen=True)
class WindowHealth:
    """What the monitor saw between the window markers."""

    #: Node -> names of throttle bits seen set (current-state bits only) during the window.
    throttled: Mapping[str, Sequence[str]] = field(default_factory=dict)
    #: Node -> governors read during the window.
    governors: Mapping[str, Sequence[str]] = field(default_factory=dict)
    #: Node -> highest temperature read.
    max_temp_c: Mapping[str, float] = field(default_factory=dict)
    #: Ambient readings (min, max) in °C, or None when none were taken.
    ambient_c: tuple[float, float] | None = None
    #: Health readings taken per node (0 means the window was not observed at all).
    readings: Mapping[str, int] = field(default_factory=dict)


def judge(
    energy: Sequence[NodeEnergy],
    health: WindowHealth,
    bench: Mapping[str, Any],
    tokens: int,
    thresholds: Any,
) -> list[str]:
    """The reasons the repetition is invalid; ``thresholds`` is the config's ``Thresholds``."""
    reasons: list[str] = []
    for e in energy:
        if e.coverage < thresholds.coverage_min:
            reasons.append(
                f"meter coverage of {e.node} is {e.coverage * 100:.1f}% (needs {thresholds.coverage_min * 100:g}%)"
            )
        if e.longest_gap_s > thresholds.gap_limit_s:
            reasons.append(f"gap of {e.longest_gap_s:.2f} s on {e.node} (limit {thresholds.gap_limit_s:g} s)")
        if not e.start_covered or not e.end_covered:
            which = " and ".join(w for w, ok in (("start", e.start_covered), ("end", e.end_covered)) if not ok)
            reasons.append(f"window {which} not covered by samples on {e.node}")
        if e.joules is None and e.coverage >= thresholds.coverage_min:
            reasons.append(f"no energy figure for {e.node}")
    for node, bits in sorted(health.throttled.items()):
        if bits:
            reasons.append(f"{node} throttled during the window ({', '.join(sorted(set(bits)))})")
    for node, govs in sorted(health.governors.items()):
        bad = sorted({g for g in govs if g != "performance"})
        if bad:
            reasons.append(f"{node} governor was {', '.join(bad)} (needs performance)")
    for node, n in sorted(health.readings.items()):
        if n == 0:
            reasons.append(f"{node} health was not read during the window")
    for node, temp in sorted(health.max_temp_c.items()):
        if temp >= thresholds.node_temp_max_c:
            reasons.append(f"{node} reached {temp:.1f} °C (limit {thresholds.node_temp_max_c:g} °C)")
    lo_band = thresholds.ambient_c - thresholds.ambient_tol_c
    hi_band = thresholds.ambient_c + thresholds.ambient_tol_c
    if health.ambient_c is None:
        reasons.append("ambient temperature was not read")
    else:
        lo, hi = health.ambient_c
        if lo < lo_band or hi > hi_band:
            reasons.append(f"ambient {lo:.1f}..{hi:.1f} °C outside {lo_band:g}..{hi_band:g} °C")
    if tokens <= 0:
        reasons.append(f"token count is {tokens} ({thresholds.token_denominator} tokens)")
    if not bench.get("finished", True):
        reasons.append("the benchmark did not finish")
    failed = int(bench.get("failed_requests_final", 0) or 0)
    if failed:
        reasons.append(f"{failed} benchmark requests failed after retries")
    return reasons
