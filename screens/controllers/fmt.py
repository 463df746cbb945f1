"""Number formatting shared by the controllers: fixed widths, units, and an em dash for missing values.

A missing value is never shown as 0 (a gap is not zero watts).
"""

from __future__ import annotations

import math
import time

MISSING = "—"


def num(value: float | None, digits: int = 1, unit: str = "") -> str:
    """``value`` with ``digits`` decimals and an optional unit; the missing mark for None/NaN."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING
    text = f"{value:.{digits}f}"
    return f"{text} {unit}" if unit else text


def joules(value: float | None) -> str:
    """Energy with a readable unit (J, kJ, MJ)."""
    if value is None or not math.isfinite(value):
        return MISSING
    for scale, unit in ((1e6, "MJ"), (1e3, "kJ")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.1f} J"


def duration(seconds: float | None) -> str:
    """``1h 02m``, ``4m 05s``, ``12s``; the missing mark for None or negative."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return MISSING
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s}s"


def clock(t: float | None) -> str:
    """Local wall time ``HH:MM:SS`` of an epoch time."""
    if not t:
        return MISSING
    return time.strftime("%H:%M:%S", time.localtime(t))


def pct(value: float | None, digits: int = 1) -> str:
    """A 0..1 fraction as a percentage."""
    if value is None or not math.isfinite(value):
        return MISSING
    return f"{100 * value:.{digits}f}%"


def ghz(hz: int | float | None) -> str:
    if not hz:
        return MISSING
    return f"{hz / 1e9:.2f} GHz"
