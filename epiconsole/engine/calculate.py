"""The calculate stage: energy over a window per node, J/token, composite accuracy, EPI and validity.

Time bases. Windows are selected in host time (the markers), but energy is integrated over *device*
time: the meter's own ``ms`` clock, which is what its energy counters and sample intervals are measured
in. For the real lab the two run at the same rate; the simulated lab's device clock runs ``time_scale``
times faster, and integrating over device time gives joules at their real-world magnitude. The window's
ends are mapped to device time by interpolating (host t, device ms) over the samples around them.

The integration itself is :func:`epiconsole.epi.window_energy` (energy counters where both ends are
covered, else trapezoids of W, never across a gap); this module only selects, maps and assembles the
result in the seed's EPI JSON schema (energy / accuracy / epi / environment / run_metadata) plus
``validity`` and per-node details.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from epiconsole.engine.validity import NodeEnergy, WindowHealth, judge
from epiconsole.ledger import SampleBlock


def device_seconds(block: SampleBlock, scale: float) -> np.ndarray:
    """Device time of each tick in seconds, continuous across uint32 wraps and reboots.

    Steps come from the device's ``ms``; where ``ms`` goes backwards (a reboot, or a wrap) the step is
    the host step times ``scale`` instead, so the axis stays monotonic.
    """
    n = block.n
    if n == 0:
        return np.empty(0)
    ms = block.ms.astype(np.float64)
    d = np.diff(ms) / 1000.0
    host = np.diff(block.t) * scale
    bad = (d < 0) | (d > np.maximum(host, 0) * 4 + 60.0)
    d = np.where(bad, np.maximum(host, 0.0), d)
    out = np.empty(n)
    out[0] = 0.0
    np.cumsum(d, out=out[1:])
    return out


def device_order(block: SampleBlock) -> SampleBlock:
    """The ticks in the board's order. Host times come from a running clock fit whose refits can swap
    neighbouring ticks by a hair; the board's ``ms`` cannot. Across a reboot (``seq`` restarts) the
    host order is kept."""
    if block.n < 2:
        return block
    order = np.argsort(block.ms, kind="stable")
    seq = block.seq[order]
    if bool(np.all(np.diff(seq) > 0)):
        return block.take(order)
    return block.sorted_by_time()


def tokens_for(bench: Mapping[str, Any], denominator: str) -> int:
    tok = bench.get("tokens") or {}
    prompt, completion = int(tok.get("prompt", 0) or 0), int(tok.get("completion", 0) or 0)
    return {"prompt": prompt, "completion": completion}.get(denominator, prompt + completion)


def compute(
    block: SampleBlock,
    t0: float,
    t1: float,
    bench: Mapping[str, Any],
    health: WindowHealth,
    *,
    cfg: Any,
    scale: float,
    meta: Mapping[str, Any],
) -> dict[str, Any]:
    """The repetition's EPI result (seed schema + validity) from the samples around [t0, t1]."""
    from epiconsole import epi

    th = cfg.thresholds
    channels = {int(k): v for k, v in cfg.meter.channels.items() if v in cfg.cluster.nodes}
    block = device_order(block)
    dev = device_seconds(block, scale)
    if block.n >= 2:
        d0 = float(np.interp(t0, block.t, dev))
        d1 = float(np.interp(t1, block.t, dev))
    else:
        d0, d1 = 0.0, max(t1 - t0, 0.0) * scale
    per_node: dict[str, Any] = {}
    energies: list[NodeEnergy] = []
    total: float | None = 0.0
    inside = (block.t >= t0) & (block.t <= t1)
    for ch, node in sorted(channels.items()):
        w = block.W[:, ch] if block.n else np.empty(0)
        wh = block.Wh[:, ch] if block.n else np.empty(0)
        e = epi.window_energy(dev, w, wh, d0, d1, th.gap_limit_s)
        sel = dev[(dev >= d0) & (dev <= d1)] if block.n else dev
        start_cov = bool(block.n and (dev <= d0).any() and (d0 - dev[dev <= d0].max()) <= th.gap_limit_s)
        end_cov = bool(block.n and (dev >= d1).any() and (dev[dev >= d1].min() - d1) <= th.gap_limit_s)
        energies.append(NodeEnergy(node, e.joules, e.coverage, e.longest_gap_s, start_cov, end_cov))
        per_node[node] = {
            "channel": ch,
            "joules": e.joules,
            "method": e.method,
            "coverage": e.coverage,
            "longest_gap_s": e.longest_gap_s,
            "n_samples": int(sel.shape[0]),
            "mean_watts": e.mean_watts,
            "peak_watts": e.peak_watts,
        }
        total = None if total is None or e.joules is None else total + e.joules
    tokens = tokens_for(bench, th.token_denominator)
    duration = d1 - d0
    cluster_w = np.nansum(block.W[inside][:, sorted(channels)], axis=1) if inside.any() else np.empty(0)
    jpt = epi.joules_per_token(total, tokens)
    composite = bench.get("composite")
    value = epi.epi(jpt, composite)
    reasons = judge(energies, health, bench, tokens, th)
    accuracy: dict[str, Any] = {k: v.get("acc") for k, v in (bench.get("tasks") or {}).items()}
    accuracy["composite"] = composite
    accuracy["stderr"] = {k: v.get("stderr") for k, v in (bench.get("tasks") or {}).items()}
    tok = bench.get("tokens") or {}
    return {
        "energy": {
            "total_joules": total,
            "total_tokens": tokens,
            "joules_per_token": jpt,
            "avg_watts_cluster": (total / duration) if total is not None and duration > 0 else None,
            "peak_watts_cluster": float(cluster_w.max()) if cluster_w.size else None,
            "duration_seconds": duration,
            "kwh_total": total / 3.6e6 if total is not None else None,
            "coverage_min": min((e.coverage for e in energies), default=0.0),
            "per_node": per_node,
            "time_base": "device",
        },
        "accuracy": accuracy,
        "epi": {"value": value, "joules_per_token": jpt, "accuracy_composite": composite},
        "tokens": {
            "prompt": int(tok.get("prompt", 0) or 0),
            "completion": int(tok.get("completion", 0) or 0),
            "denominator": th.token_denominator,
            "counted": tokens,
        },
        "environment": {
            "ambient_c": list(health.ambient_c) if health.ambient_c else None,
            "node_max_temp_c": dict(health.max_temp_c),
            "throttled": {k: list(v) for k, v in health.throttled.items()},
            "governors": {k: list(v) for k, v in health.governors.items()},
            "simulated": cfg.simulated,
        },
        "run_metadata": {
            **meta,
            "window": {"t0": t0, "t1": t1, "device_t0": d0, "device_t1": d1, "host_seconds": t1 - t0},
            "requests": bench.get("requests"),
            "failed_requests": bench.get("failed_requests"),
            "lm_eval_version": bench.get("lm_eval_version"),
            "simulated": cfg.simulated,
        },
        "validity": {"valid": not reasons, "reasons": reasons},
        "simulated": cfg.simulated,
    }


def finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None
