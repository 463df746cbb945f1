"""Export a campaign in the paper's ``data/`` layout, with a summary CSV and the markdown report.

Layout (``NNN`` = repetition, from 001)::

    OUT/summary.csv                     one row per configuration (medians, spread, change vs baseline)
    OUT/repetitions.csv                 one row per repetition
    OUT/report.md                       the paper's tables, optimal depths, Pareto set, decomposition, curve
    OUT/<config_id>/run_NNN.json        the trial: status, verdict, stages, window, gaps, provenance, checks
    OUT/<config_id>/power_trace_NNN.csv the meter samples of the window, one row per tick and node
    OUT/<config_id>/benchmark_NNN.json  the benchmark result as the ledger holds it
    OUT/<config_id>/epi_NNN.json        the seed's EPI schema: energy, accuracy, epi, environment, run_metadata

Everything is built from the ledger's records, so any campaign exports, finished or not. A repetition
that finished (valid or invalid) gets all four files; a failed one gets its ``run_NNN.json`` (and its
benchmark when it got that far). Simulated campaigns say so in every file: ``"simulated": true`` in
JSON, a ``# SIMULATED DATA`` first line in CSV and markdown.

Power trace. Energy is integrated over the meter's *device* time (see
:mod:`epiconsole.engine.calculate`: the simulated meter's clock runs ``time_scale`` times faster than
host time), so the trace carries both: ``timestamp`` (host epoch s), ``device_s`` (device seconds from
the window start; the window is ``[0, energy.duration_seconds]``) and ``device_ms`` as the board sent
it. Rows are every tick inside the window plus the one just before and the one just after it
(``in_window`` 0), so a reader can integrate exactly up to the window's ends. Missing values are empty
cells, never 0. :func:`verify` re-reads an export and checks, per repetition, ``epi.value =
joules_per_token / accuracy.composite``, ``joules_per_token = total_joules / total_tokens`` and that
integrating the exported trace agrees with ``total_joules`` within 1%.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import epiconsole
from epiconsole.errors import UserError

SIMULATED_LINE = "# SIMULATED DATA"
ENERGY_KEYS = ("total_joules", "total_tokens", "joules_per_token", "avg_watts_cluster", "peak_watts_cluster",
               "duration_seconds", "kwh_total")
TRACE_HEADER = ("timestamp", "device_s", "device_ms", "in_window", "node", "channel", "watts", "volts", "amps",
                "pf", "var", "hz", "wh")
#: Relative tolerance of the trace-integral check (the issue's 1%).
TRACE_TOLERANCE = 0.01
#: File marking a directory as an epiconsole export (so a re-export may overwrite it).
MARKER = ".epiconsole-export"


@dataclass(frozen=True)
class TrialExport:
    config_id: str
    rep: int
    status: str
    valid: bool | None
    files: tuple[str, ...]
    #: All four files written.
    complete: bool
    total_joules: float | None = None
    trace_joules: float | None = None

    @property
    def trace_agreement(self) -> float | None:
        """|trace - total| / total, or None when either is missing."""
        if self.total_joules is None or self.trace_joules is None or self.total_joules == 0:
            return None
        return abs(self.trace_joules - self.total_joules) / abs(self.total_joules)


@dataclass(frozen=True)
class ExportResult:
    out: Path
    campaign_id: int
    simulated: bool
    trials: tuple[TrialExport, ...]
    files: int
    problems: tuple[str, ...] = field(default=())

    @property
    def complete(self) -> int:
        """Repetitions with all four files."""
        return sum(1 for t in self.trials if t.complete)


# ------------------------------------------------------------------------------------------ helpers


def _plain(obj: Any) -> Any:
    """JSON-ready: NaN/inf become null, numpy scalars Python, tuples lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, np.generic):
        return _plain(obj.item())
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def _json(obj: Any) -> str:
    return json.dumps(_plain(obj), indent=2, allow_nan=False) + "\n"


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v) if math.isfinite(v) else None


def _cell(v: float, spec: str) -> str:
    return "" if not math.isfinite(v) else format(v, spec)


def check_out_dir(out: Path, *, force: bool = False) -> None:
    """Refuse to write into a non-empty directory that is not an earlier export (unless ``force``)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; give --out a directory.")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists() and not force:
        raise UserError(f"{out} is not empty and not an earlier export; choose another --out or add --force.")


def _write_marker(out: Path, campaign_id: int, files: list[str]) -> None:
    """Mark ``out`` as an export and list the files it wrote (relative), for the next re-export."""
    (out / MARKER).write_text(json.dumps({"campaign": campaign_id, "files": files}, indent=1) + "\n", "utf-8")


def _remove_previous(out: Path) -> None:
    """Delete the files an earlier export listed in its marker (nothing else), then its emptied folders."""
    try:
        listed = json.loads((out / MARKER).read_text("utf-8")).get("files") or []
    except (OSError, ValueError, AttributeError):
        return  # no marker, or one without a file list: nothing known to remove
    root = out.resolve()
    folders = set()
    for rel in listed:
        path = (out / str(rel)).resolve()
        if root not in path.parents or not path.is_file():
            continue  # never outside the export, never a folder
        path.unlink()
        folders.add(path.parent)
    for folder in folders:
        if folder != root and not any(folder.iterdir()):
            folder.rmdir()


# ------------------------------------------------------------------------------------------ seed schema


def epi_document(epi: Mapping[str, Any], bench: Mapping[str, Any] | None, meta: Mapping[str, Any],
                 simulated: bool, peak_watts: float | None = None) -> dict[str, Any]:
    """The seed's EPI JSON for one repetition, from the ledger's EPI result (extra keys are kept)."""
    energy_in = dict(epi.get("energy") or {})
    total = _num(energy_in.get("total_joules"))
    duration = _num(energy_in.get("duration_seconds"))
    energy: dict[str, Any] = {k: energy_in.get(k) for k in ENERGY_KEYS}
    # Derived figures the engine may not have stored; never invented where their inputs are missing.
    if energy["avg_watts_cluster"] is None and total is not None and duration:
        energy["avg_watts_cluster"] = total / duration
    if energy["peak_watts_cluster"] is None:
        energy["peak_watts_cluster"] = peak_watts
    if energy["kwh_total"] is None and total is not None:
        energy["kwh_total"] = total / 3.6e6
    energy.update({k: v for k, v in energy_in.items() if k not in energy})
    accuracy = dict(epi.get("accuracy") or (bench or {}).get("accuracy") or {})
    if "composite" not in accuracy and bench:
        accuracy["composite"] = bench.get("composite")
    epi_in = dict(epi.get("epi") or {})
    value = {
        "value": epi_in.get("value"),
        "joules_per_token": epi_in.get("joules_per_token", energy.get("joules_per_token")),
        "accuracy_composite": epi_in.get("accuracy_composite", accuracy.get("composite")),
    }
    value.update({k: v for k, v in epi_in.items() if k not in value})
    run_metadata = {**dict(epi.get("run_metadata") or {}), **meta, "simulated": simulated}
    doc: dict[str, Any] = {
        "simulated": simulated,
        "energy": energy,
        "accuracy": accuracy,
        "epi": value,
        "environment": {**dict(epi.get("environment") or {}), "simulated": simulated},
        "run_metadata": run_metadata,
    }
    for key in ("tokens", "validity"):
        if key in epi:
            doc[key] = epi[key]
    return doc


# ------------------------------------------------------------------------------------------ trace


@dataclass(frozen=True)
class Trace:
    """The window's samples ready for the CSV: ticks in time order with their device time."""

    t: np.ndarray
    device_s: np.ndarray
    ms: np.ndarray
    in_window: np.ndarray
    #: (channel, node) pairs in column order.
    channels: tuple[tuple[int, str], ...]
    W: np.ndarray
    V: np.ndarray
    A: np.ndarray
    PF: np.ndarray
    VAR: np.ndarray
    Hz: np.ndarray
    Wh: np.ndarray

    @property
    def peak_watts(self) -> float | None:
        """Highest cluster watts (sum over nodes) of a tick inside the window where every node has a reading.

        A tick missing a node has no cluster figure (its sum would read the missing node as 0 W).
        """
        if not self.in_window.any():
            return None
        cols = [c for c, _ in self.channels]
        cluster = self.W[self.in_window][:, cols].sum(axis=1)  # NaN where any node is missing
        cluster = cluster[np.isfinite(cluster)]
        return float(cluster.max()) if cluster.size else None


def build_trace(block: Any, t0: float, t1: float, channels: Sequence[tuple[int, str]], scale: float) -> Trace:
    """Select the window's ticks (and the two bracketing it) from ``block`` and put them on device time."""
    from epiconsole.engine.calculate import device_order, device_seconds

    # The board's order, as the calculate stage uses: host times from the clock fit can swap
    # neighbouring ticks by a hair, and sorting by them would make device time step backwards.
    block = device_order(block)
    dev = device_seconds(block, scale)
    d0 = float(np.interp(t0, block.t, dev)) if block.n else 0.0
    inside = (block.t >= t0) & (block.t <= t1)
    keep = inside.copy()
    before = np.nonzero(block.t < t0)[0]
    after = np.nonzero(block.t > t1)[0]
    if before.size:
        keep[before[-1]] = True
    if after.size:
        keep[after[0]] = True
    b = block.take(keep)
    return Trace(
        t=b.t, device_s=dev[keep] - d0, ms=b.ms, in_window=inside[keep], channels=tuple(channels),
        W=b.W, V=b.V, A=b.A, PF=b.PF, VAR=b.VAR, Hz=b.Hz, Wh=b.Wh,
    )


def trace_csv(trace: Trace, simulated: bool) -> str:
    """The power trace as CSV text: one row per tick and node, in time order."""
    head = ",".join(TRACE_HEADER) + "\n"
    n = trace.t.shape[0]
    if n == 0 or not trace.channels:
        return (SIMULATED_LINE + "\n" if simulated else "") + head
    # One %-format per channel with the node name baked in, applied to plain Python floats: about
    # five times faster than csv.writer on numpy scalars (a long window has millions of rows).
    cols = [trace.t, trace.device_s, trace.ms.astype(np.float64), trace.in_window.astype(np.float64)]
    per_tick = np.column_stack(cols).tolist()
    lines: list[str] = []
    for ch, node in trace.channels:
        fmt = f"%.3f,%.4f,%d,%d,{node},{ch},%.4f,%.2f,%.3f,%.3f,%.3f,%.2f,%.6f"
        vals = np.column_stack([trace.W[:, ch], trace.V[:, ch], trace.A[:, ch], trace.PF[:, ch],
                                trace.VAR[:, ch], trace.Hz[:, ch], trace.Wh[:, ch]]).tolist()
        lines.append([fmt % (*a, *b) for a, b in zip(per_tick, vals, strict=True)])  # type: ignore[arg-type]
    # Interleave so rows go tick by tick, node by node.
    rows = [row for group in zip(*lines, strict=True) for row in group]
    body = "\n".join(rows) + "\n"
    if "nan" in body:
        # A missing value is an empty cell, never 0 and never the string nan.
        body = re.sub(r"(?<=,)nan(?=,|\n)", "", body)
    return (SIMULATED_LINE + "\n" if simulated else "") + head + body


def read_trace(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """An exported power trace as node -> (device_s, watts) arrays (missing watts are NaN)."""
    rows: dict[str, list[tuple[float, float]]] = {}
    with path.open(newline="", encoding="utf-8") as f:
        lines = (line for line in f if not line.startswith("#"))
        for row in csv.DictReader(lines):
            w = float(row["watts"]) if row["watts"] else math.nan
            rows.setdefault(row["node"], []).append((float(row["device_s"]), w))
    out = {}
    for node, pairs in rows.items():
        a = np.array(pairs, dtype=np.float64).reshape(-1, 2)
        order = np.argsort(a[:, 0], kind="stable")
        out[node] = (a[order, 0], a[order, 1])
    return out


def trace_joules(trace: Mapping[str, tuple[np.ndarray, np.ndarray]], duration_s: float, gap_limit_s: float) -> float | None:
    """Energy of the window ``[0, duration_s]`` from traces alone (trapezoids of watts, never across a gap)."""
    from epiconsole import epi

    total = 0.0
    for dev, w in trace.values():
        # No energy counter: window_energy falls back to trapezoids of W over device time.
        e = epi.window_energy(dev, w, np.full_like(w, np.nan), 0.0, duration_s, gap_limit_s)
        if e.joules is None:
            return None
        total += e.joules
    return total


# ------------------------------------------------------------------------------------------ export


def _gap_limit(cfg: Any) -> float:
    return float(cfg.thresholds.gap_limit_s) if cfg is not None else 1.0


def _channels_for(epi: Mapping[str, Any] | None, cfg: Any) -> list[tuple[int, str]]:
    """(channel, node): what the engine recorded with the result, else the config's meter map."""
    per_node = ((epi or {}).get("energy") or {}).get("per_node") or {}
    pairs = [(int(v["channel"]), str(k)) for k, v in per_node.items() if isinstance(v, Mapping) and "channel" in v]
    if pairs:
        return sorted(pairs)
    if cfg is not None:
        return sorted((int(ch), node) for ch, node in cfg.meter.channels.items())
    return [(i, f"ch{i}") for i in range(4)]


async def export_campaign(
    ledger: Any,
    out: str | Path,
    *,
    campaign_id: int | None = None,
    cfg: Any = None,
    force: bool = False,
) -> ExportResult:
    """Write the export of ``campaign_id`` (default: the latest campaign) under ``out``."""
    from epiconsole import analysis, report

    out = Path(out).expanduser()
    check_out_dir(out, force=force)
    campaign = await (ledger.campaign(campaign_id) if campaign_id is not None else ledger.latest_campaign())
    if campaign is None:
        which = f"campaign {campaign_id}" if campaign_id is not None else "campaign"
        raise UserError(f"The ledger {ledger.path} holds no {which}; run one first (`epiconsole run`).")
    simulated = bool(campaign.simulated)
    scale = float(cfg.sim.time_scale) if (cfg is not None and simulated) else 1.0
    gap_limit = _gap_limit(cfg)
    results = await ledger.results(campaign.id)
    written = 0
    trials: list[TrialExport] = []
    problems: list[str] = []
    try:
        await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"Cannot create {out} ({exc.strerror or exc}); choose an --out where you can write.") from None
    # An earlier export's files go first: a re-export of another campaign (or of fewer repetitions)
    # must not leave stale repetitions beside the new ones, where verify and readers would take them.
    await asyncio.to_thread(_remove_previous, out)
    await asyncio.to_thread(_write_marker, out, campaign.id, [])
    for res in results:
        trial = res.trial
        if trial.status in ("pending", "running") and res.epi is None and res.benchmark is None:
            continue
        te, files = await _export_trial(ledger, out, campaign, res, cfg, scale, gap_limit, simulated)
        trials.append(te)
        written += files
        agreement = te.trace_agreement
        if te.valid and agreement is not None and agreement > TRACE_TOLERANCE:
            problems.append(f"{te.config_id} rep {te.rep}: the exported trace integrates to {te.trace_joules:.1f} J, "
                            f"{agreement * 100:.2f}% off the stored {te.total_joules:.1f} J")
    tol = cfg.thresholds.accuracy_tolerance_pts if cfg is not None else 1.0
    a = analysis.analyze(results, tolerance_pts=tol, simulated=simulated, campaign_id=campaign.id,
                         meter_uncertainty_pct=await _meter_uncertainty(ledger, results))
    summary = summary_csv(a)
    reps = repetitions_csv(a)
    md = report.render(a, campaign=campaign)
    for name, text in (("summary.csv", summary), ("repetitions.csv", reps), ("report.md", md)):
        await asyncio.to_thread((out / name).write_text, text, "utf-8")
        written += 1
    listed = [f"{t.config_id}/{name}" for t in trials for name in t.files]
    await asyncio.to_thread(_write_marker, out, campaign.id, [*listed, "summary.csv", "repetitions.csv", "report.md"])
    return ExportResult(out=out, campaign_id=campaign.id, simulated=simulated, trials=tuple(trials),
                        files=written, problems=tuple(problems))


def _window_of(res: Any) -> tuple[float, float] | None:
    """The window the stored EPI was computed over (its run metadata, else the benchmark's)."""
    for w in (((res.epi or {}).get("run_metadata") or {}).get("window"), (res.benchmark or {}).get("window")):
        if isinstance(w, Mapping):
            t0, t1 = _num(w.get("t0")), _num(w.get("t1"))
            if t0 is not None and t1 is not None and t1 > t0:
                return t0, t1
    return None


async def _meter_uncertainty(ledger: Any, results: Sequence[Any]) -> float | None:
    """The meter's stated uncertainty (percent) as the first trial's provenance recorded it."""
    for res in results:
        prov = await ledger.provenance("trial", res.trial.id)
        meter = ((prov or {}).get("lab") or {}).get("meter") or {}
        pct = _num(meter.get("uncertainty_pct"))
        if pct is not None:
            return pct
    return None


async def _export_trial(ledger: Any, out: Path, campaign: Any, res: Any, cfg: Any, scale: float,
                        gap_limit: float, simulated: bool) -> tuple[TrialExport, int]:
    trial = res.trial
    nnn = f"{trial.rep:03d}"
    folder = _folder(out, trial.config_id)
    await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    window = _window_of(res) or await ledger.window(trial.id)
    checkpoints = await ledger.checkpoints(trial.id)
    provenance = await ledger.provenance("trial", trial.id)
    files: dict[str, str] = {}
    trace: Trace | None = None
    gaps: list[Any] = []
    channels = _channels_for(res.epi, cfg)
    if window is not None and res.epi is not None:
        t0, t1 = window
        margin = gap_limit / scale * 2 + 0.5
        block = await ledger.read_samples(t0 - margin, t1 + margin)
        trace = build_trace(block, t0, t1, channels, scale)
        gaps = await ledger.gaps(t0, t1)
        files[f"power_trace_{nnn}.csv"] = await asyncio.to_thread(trace_csv, trace, simulated)
    meta = {
        "campaign_id": campaign.id,
        "plan": campaign.plan_name,
        "config_id": trial.config_id,
        "repetition": trial.rep,
        "trial_id": trial.id,
        "experts_dropped": trial.experts,
        "target": trial.target,
        "strategy": trial.config.get("strategy"),
        "model": trial.config.get("model"),
        "valid": trial.valid,
        "reasons": list(trial.reasons),
        "window_start": _iso(window[0]) if window else None,
        "window_end": _iso(window[1]) if window else None,
        # The denominator the stored EPI used, else the one recorded for the trial or the campaign.
        "token_denominator": ((res.epi or {}).get("tokens") or {}).get("denominator")
        or (provenance or {}).get("token_denominator")
        or (campaign.provenance or {}).get("token_denominator"),
        "config_digest": campaign.config_digest,
        "exported_by": f"epiconsole {epiconsole.__version__}",
    }
    total = None
    traced = None
    if res.epi is not None:
        doc = epi_document(res.epi, res.benchmark, meta, simulated, trace.peak_watts if trace else None)
        files[f"epi_{nnn}.json"] = _json(doc)
        total = _num(doc["energy"]["total_joules"])
        duration = _num(doc["energy"]["duration_seconds"])
        if trace is not None and duration is not None:
            traced = trace_joules(_trace_arrays(trace), duration, gap_limit)
    if res.benchmark is not None:
        files[f"benchmark_{nnn}.json"] = _json({"simulated": simulated, "config_id": trial.config_id,
                                                "repetition": trial.rep, **res.benchmark})
    run = {
        "simulated": simulated,
        **meta,
        "status": trial.status,
        "window": {"t0": window[0], "t1": window[1]} if window else None,
        "stages": [{"stage": c.stage, "status": c.status, "t": c.t, "time": _iso(c.t), "data": c.data}
                   for c in checkpoints],
        "gaps": [{"t0": g.t0, "t1": g.t1, "cause": g.cause, "channel": g.channel} for g in gaps],
        "provenance": provenance,
        "campaign_provenance": campaign.provenance,
        "trace": None if trace is None else {
            "ticks": int(trace.t.shape[0]),
            "ticks_in_window": int(trace.in_window.sum()),
            "channels": {node: ch for ch, node in trace.channels},
            "time_base": "device_s from the window start; window = [0, energy.duration_seconds]",
            "gap_limit_s": gap_limit,
            "integrated_joules": traced,
        },
        "checks": _checks(files.get(f"epi_{nnn}.json"), traced),
    }
    files[f"run_{nnn}.json"] = _json(run)
    for name, text in files.items():
        await asyncio.to_thread((folder / name).write_text, text, "utf-8")
    complete = all(f"{k}_{nnn}.{e}" in files for k, e in (("run", "json"), ("power_trace", "csv"),
                                                           ("benchmark", "json"), ("epi", "json")))
    te = TrialExport(trial.config_id, trial.rep, trial.status, trial.valid, tuple(sorted(files)), complete,
                     total, traced)
    return te, len(files)


def _folder(out: Path, config_id: str) -> Path:
    """``out/<config_id>``, refusing an id that is not one plain folder name (``..`` would write outside)."""
    if config_id in ("", ".", "..") or any(c in config_id for c in "/\\\0"):
        raise UserError(f"The configuration id {config_id!r} cannot name a folder; rename it in the plan and export again.")
    return out / config_id


def _trace_arrays(trace: Trace) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    # The same rounding as the CSV, so the stored check equals what a reader of the file gets.
    dev = np.round(trace.device_s, 4)
    return {node: (dev, np.round(trace.W[:, ch], 4)) for ch, node in trace.channels}


def _checks(epi_text: str | None, traced: float | None) -> dict[str, Any] | None:
    if epi_text is None:
        return None
    return consistency(json.loads(epi_text), traced)


def consistency(doc: Mapping[str, Any], traced: float | None) -> dict[str, Any]:
    """The export's consistency checks on one EPI document (``None`` where an input is missing)."""
    energy = doc.get("energy") or {}
    total, tokens, jpt = _num(energy.get("total_joules")), _num(energy.get("total_tokens")), _num(energy.get("joules_per_token"))
    composite = _num((doc.get("accuracy") or {}).get("composite"))
    value = _num((doc.get("epi") or {}).get("value"))

    def close(a: float | None, b: float | None) -> bool | None:
        if a is None or b is None:
            return None
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)

    agreement = None if traced is None or not total else abs(traced - total) / abs(total)
    # At accuracy 0 EPI is undefined: a missing value is then the consistent one.
    epi_ok = (value is None) if composite == 0.0 else close(value, jpt / composite if jpt is not None and composite else None)
    return {
        "jpt_is_joules_over_tokens": close(jpt, total / tokens if total is not None and tokens else None),
        "epi_is_jpt_over_accuracy": epi_ok,
        "trace_agreement": agreement,
        "trace_within_1pct": None if agreement is None else agreement <= TRACE_TOLERANCE,
    }


# ------------------------------------------------------------------------------------------ verify


def verify(out: str | Path, gap_limit_s: float = 1.0) -> tuple[int, list[str]]:
    """Re-read an export: (repetitions checked, problems).

    Every repetition's ``joules_per_token = total_joules / total_tokens`` and ``epi.value =
    joules_per_token / accuracy.composite`` are checked; a valid repetition must also have every figure
    and a power trace that integrates to ``total_joules`` within 1%.
    """
    out = Path(out)
    checked = 0
    problems: list[str] = []
    for epi_path in sorted(out.glob("*/epi_*.json")):
        nnn = epi_path.stem.split("_")[-1]
        folder = epi_path.parent
        doc = json.loads(epi_path.read_text(encoding="utf-8"))
        valid = (doc.get("run_metadata") or {}).get("valid")
        missing = [n for n in (f"run_{nnn}.json", f"power_trace_{nnn}.csv", f"benchmark_{nnn}.json")
                   if not (folder / n).exists()]
        where = f"{folder.name} rep {int(nnn)}"
        if missing:
            problems.append(f"{where}: missing {', '.join(missing)}")
            continue
        duration = _num((doc.get("energy") or {}).get("duration_seconds"))
        run = json.loads((folder / f"run_{nnn}.json").read_text(encoding="utf-8"))
        # The gap limit the export ran with (recorded in the run file) beats the caller's default.
        limit = _num((run.get("trace") or {}).get("gap_limit_s")) or gap_limit_s
        traced = None
        if duration is not None:
            traced = trace_joules(read_trace(folder / f"power_trace_{nnn}.csv"), duration, limit)
        c = consistency(doc, traced)
        checked += 1
        # The identities hold for every repetition with figures (a missing figure is not checked). The
        # trace must match only for valid ones: an invalid repetition may have gaps that the energy
        # counter spans but a trace cannot.
        keys = ["jpt_is_joules_over_tokens", "epi_is_jpt_over_accuracy"]
        if valid:
            keys.append("trace_within_1pct")
        for key in keys:
            if c[key] is False or (valid and c[key] is None):
                detail = f" ({c['trace_agreement'] * 100:.2f}% off)" if key == "trace_within_1pct" and c["trace_agreement"] is not None else ""
                problems.append(f"{where}: {key} failed{detail}")
    return checked, problems


# ------------------------------------------------------------------------------------------ CSVs


def _csv(rows: list[Sequence[Any]], header: Sequence[str], simulated: bool) -> str:
    buf = io.StringIO()
    if simulated:
        buf.write(SIMULATED_LINE + "\n")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in row])
    return buf.getvalue()


SUMMARY_HEADER = (
    "order", "config_id", "experts", "target", "strategy", "repetitions", "valid", "invalid", "failed",
    "jpt_median", "jpt_min", "jpt_max", "accuracy_median", "accuracy_min", "accuracy_max",
    "epi_median", "epi_min", "epi_max", "joules_median", "tokens_median", "seconds_median", "watts_median",
    "jpt_change_pct", "accuracy_change_pts", "epi_change_pct", "dln_energy", "dln_power", "dln_time", "pareto",
    "epi_uncertainty_pct",
)


def summary_csv(a: Any) -> str:
    """One row per configuration: medians and ranges over valid repetitions, changes vs baseline."""
    rows = []
    for c in a.configs:
        def s(x: Any) -> tuple[Any, Any, Any]:
            return (None, None, None) if x is None else (x.median, x.lo, x.hi)

        def m(x: Any) -> Any:
            return None if x is None else x.median

        d = c.decomposition
        rows.append((c.ord, c.config_id, c.experts, c.target or "", c.strategy or "", c.repetitions, c.valid,
                     c.invalid, c.failed, *s(c.jpt), *s(c.accuracy), *s(c.epi), m(c.joules), m(c.tokens),
                     m(c.duration_s), m(c.avg_watts), c.jpt_change_pct, c.accuracy_change_pts, c.epi_change_pct,
                     d.d_ln_energy if d else None, d.d_ln_power if d else None, d.d_ln_time if d else None,
                     int(c.config_id in a.pareto), c.epi_uncertainty_pct))
    return _csv(rows, SUMMARY_HEADER, a.simulated)


REPETITIONS_HEADER = ("order", "config_id", "rep", "status", "valid", "joules", "tokens", "jpt", "accuracy", "epi",
                      "seconds", "avg_watts", "peak_watts", "reasons")


def repetitions_csv(a: Any) -> str:
    rows = [(r.ord, r.config_id, r.rep, r.status, "" if r.valid is None else int(r.valid), r.joules, r.tokens, r.jpt,
             r.accuracy, r.epi, r.duration_s, r.avg_watts, r.peak_watts, "; ".join(r.reasons))
            for r in a.repetitions]
    return _csv(rows, REPETITIONS_HEADER, a.simulated)
