"""``epiconsole status``: a one-shot summary of the ledger and of the lab service's live state.

It reads the ledger read-only (never the hardware), so it works from any process and any terminal while
a run goes on, and when no service runs (it says so). Exit codes: 0 whenever the state could be read,
including "no ledger yet" (nothing has run: a state, not an error, so scripts can poll it); 2 when the
config is bad or the ledger cannot be read (written by a newer epiconsole, not a ledger at all).

Only argument parsing happens at import time; the ledger (aiosqlite, numpy) loads inside :func:`run`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from epiconsole.cli import add_config_argument

HELP = "one-shot summary of the ledger (latest campaign, results) and the live state of the lab service"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Exit status: 0 whenever the state could be read (also when no ledger exists yet), "
                     "2 for a bad config or an unreadable ledger.")
    add_config_argument(parser)
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.add_argument("--ledger", metavar="FILE", help="read this ledger file instead of the config's")


def run(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from epiconsole import config

    cfg = config.load(args.config)
    path = Path(args.ledger).expanduser() if args.ledger else cfg.ledger_path()
    status = asyncio.run(gather(path))
    if args.json:
        print(json.dumps(_finite(status), indent=2, allow_nan=False))
    else:
        print(format_status(status))
    return 0


def _finite(obj: Any) -> Any:
    """JSON-safe copy: a non-finite number is missing (null), never NaN in the output."""
    import math

    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------------ gather


async def gather(path: Path, now: float | None = None) -> dict[str, Any]:
    """The status as plain JSON-able data: ``ledger``, ``campaign``, ``trials``, ``best``, ``live``."""
    import sqlite3

    from epiconsole.errors import UserError
    from epiconsole.ledger import Ledger
    from epiconsole.live import LiveSnapshot

    now = time.time() if now is None else now
    out: dict[str, Any] = {"ledger": {"path": str(path), "exists": path.exists()}, "campaign": None,
                           "trials": None, "best": None, "live": None}
    if not path.exists():
        out["message"] = f"No ledger at {path} yet: nothing has run; start one with `epiconsole run` or `epiconsole`."
        return out
    # Ledger.open turns a file that is not a ledger into a one-sentence LedgerError.
    async with await Ledger.open(path, readonly=True) as ledger:
        try:
            campaign = await ledger.latest_campaign()
            live = await ledger.get_live()
            results = await ledger.results(campaign.id) if campaign else []
        except sqlite3.DatabaseError as exc:
            raise UserError(f"{path} cannot be read ({exc}); check the file or its permissions.") from None
    snapshot = LiveSnapshot.from_live({k: e.value for k, e in live.items()})
    out["live"] = _live(snapshot, now)
    if campaign is None:
        out["message"] = "The ledger holds no campaign yet; start one with `epiconsole run` or `epiconsole`."
        return out
    out["campaign"] = {
        "id": campaign.id,
        "plan": campaign.plan_name,
        "simulated": campaign.simulated,
        "started_at": campaign.started_at,
        "finished_at": campaign.finished_at,
        "exit_status": campaign.exit_status,
        "state": campaign.exit_status or "unfinished",
    }
    out["trials"] = _trial_counts(results)
    out["best"] = _best(results)
    return out


def _trial_counts(results: list[Any]) -> dict[str, int]:
    trials = [r.trial for r in results]
    return {
        "total": len(trials),
        "done": sum(1 for t in trials if t.status == "done"),
        "valid": sum(1 for t in trials if t.status == "done" and t.valid is True),
        "invalid": sum(1 for t in trials if t.status == "done" and t.valid is False),
        "failed": sum(1 for t in trials if t.status == "failed"),
        "skipped": sum(1 for t in trials if t.status == "skipped"),
        "pending": sum(1 for t in trials if t.status in ("pending", "running")),
    }


def _best(results: list[Any]) -> dict[str, Any] | None:
    """Lowest EPI among valid repetitions so far (configurations are summarised by the analysis)."""
    from epiconsole.analysis import repetitions

    reps = [r for r in repetitions(results) if r.usable and r.epi is not None]
    if not reps:
        return None
    best = min(reps, key=lambda r: r.epi)  # type: ignore[arg-type,return-value]
    return {"config_id": best.config_id, "rep": best.rep, "epi": best.epi,
            "joules_per_token": best.jpt, "accuracy": best.accuracy}


def _live(snap: Any, now: float) -> dict[str, Any]:
    svc, meter, nodes, run_ = snap.service, snap.meter, snap.nodes, snap.run
    alive = svc.alive(now)
    out: dict[str, Any] = {
        "service": {"alive": alive, "pid": svc.pid or None, "host": svc.host, "lab": svc.lab_name,
                    "simulated": svc.simulated, "heartbeat_age_s": (now - svc.heartbeat) if svc.heartbeat else None,
                    "config_path": svc.config_path},
        "meter": None,
        "nodes": None,
        "run": None,
    }
    if not alive:
        # A dead service's last live state is history, not the lab's state: report only that it is gone.
        return out
    out["meter"] = {"connected": meter.connected, "port": meter.port, "rate_hz": meter.rate_hz,
                    "last_sample_age_s": (now - meter.last_sample) if meter.last_sample else None,
                    "good_lines": meter.good_lines, "bad_lines": meter.bad_lines,
                    "lost_lines": meter.lost_lines, "reconnects": meter.reconnects}
    out["nodes"] = {
        "api_ok": nodes.api_ok,
        "cluster_W": nodes.cluster_W,
        "nodes": {name: {"W": n.W, "temp_c": n.temp_c, "ssh_ok": n.ssh_ok, "governor": n.governor,
                         "throttled_now": list(n.throttled_now), "role": n.role}
                  for name, n in sorted(nodes.nodes.items())},
    }
    out["run"] = {"state": run_.state, "campaign_id": run_.campaign_id, "config_id": run_.config_id,
                  "repetition": run_.repetition, "stage": run_.stage, "trials_done": run_.trials_done,
                  "trials_total": run_.trials_total, "eta_s": run_.eta_s, "suspender": run_.suspender,
                  "message": run_.message}
    return out


# ------------------------------------------------------------------------------------------ text


def _num(v: float | None, fmt: str = ".3g", unit: str = "") -> str:
    return "-" if v is None else f"{v:{fmt}}{unit}"


def _ago(t: float | None, now: float) -> str:
    if not t:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f" ({_duration(now - t)} ago)"


def _duration(s: float) -> str:
    s = max(0, int(s))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"


def format_status(status: dict[str, Any], now: float | None = None) -> str:
    """The status as a few lines of plain text."""
    now = time.time() if now is None else now
    lines = [f"ledger    {status['ledger']['path']}"]
    if status.get("message"):
        lines.append(status["message"])
    c = status.get("campaign")
    if c:
        sim = " (SIMULATED)" if c["simulated"] else ""
        lines.append(f"campaign  #{c['id']} {c['plan']}{sim}: {c['state']}, started {_ago(c['started_at'], now)}")
        t = status["trials"]
        lines.append(f"trials    {t['done']}/{t['total']} done: {t['valid']} valid, {t['invalid']} invalid, "
                     f"{t['failed']} failed, {t['skipped']} skipped, {t['pending']} to go")
        b = status.get("best")
        if b:
            lines.append(f"best EPI  {b['epi']:.4g} J/token/accuracy ({b['config_id']} rep {b['rep']}: "
                         f"{_num(b['joules_per_token'], '.4g')} J/token, accuracy {_num(b['accuracy'], '.3f')})")
        else:
            lines.append("best EPI  - (no valid repetition yet)")
    live = status.get("live")
    if live is None:
        return "\n".join(lines)
    svc = live["service"]
    if not svc["alive"]:
        lines.append("service   not running (no heartbeat); `epiconsole` or `epiconsole service` starts it")
        if c and c["state"] == "unfinished":
            lines.append(f"          campaign #{c['id']} is unfinished: `epiconsole run --headless --resume` "
                         "(or the console) continues it at its first unfinished stage")
        return "\n".join(lines)
    sim = ", SIMULATED" if svc["simulated"] else ""
    lines.append(f"service   running: pid {svc['pid']} on {svc['host'] or '?'} ({svc['lab'] or 'lab'}{sim})")
    m = live["meter"]
    if m["connected"]:
        lines.append(f"meter     connected on {m['port']} at {m['rate_hz']:g} Hz, last sample "
                     f"{_num(m['last_sample_age_s'], '.1f', ' s')} ago, {m['lost_lines']} lost, "
                     f"{m['bad_lines']} bad lines")
    else:
        lines.append(f"meter     NOT connected ({m['port'] or 'no port'}), {m['reconnects']} reconnects")
    n = live["nodes"]
    parts = []
    for name, node in n["nodes"].items():
        state = "ok" if node["ssh_ok"] else ("down" if node["ssh_ok"] is False else "?")
        thr = " THROTTLED" if node["throttled_now"] else ""
        parts.append(f"{name} {_num(node['W'], '.1f', ' W')} {_num(node['temp_c'], '.0f', '°C')} {state}{thr}")
    lines.append("nodes     " + ("; ".join(parts) or "-") + f"; cluster {_num(n['cluster_W'], '.1f', ' W')}, "
                 f"API {'up' if n['api_ok'] else ('down' if n['api_ok'] is False else '?')}")
    r = live["run"]
    where = " " + " ".join(x for x in (r["config_id"], f"rep {r['repetition']}", r["stage"]) if x) if r["config_id"] else ""
    eta = f", ETA {_duration(r['eta_s'])}" if r["eta_s"] else ""
    line = f"run       {r['state']}{where} ({r['trials_done']}/{r['trials_total']}{eta})"
    if r["suspender"]:
        line += f", suspended: {r['suspender']}"
    lines.append(line)
    return "\n".join(lines)
