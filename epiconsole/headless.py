"""Headless runs (``epiconsole run --headless``): a campaign without the console.

Output: rich progress on a terminal, one plain line per event when piped, and with ``--json`` one JSON
object per line whose ``"event"`` is ``campaign``, ``stage``, ``suspended``, ``resumed``, ``verdict`` or
``result`` (the engine's events, see :mod:`epiconsole.engine.events`).

Exit codes: 0 every repetition valid, 1 some repetition invalid, failed or skipped (or the campaign
failed), 2 usage or configuration error, 3 aborted.

Ctrl-C asks for a pause at the next stage boundary; a second Ctrl-C aborts. When a lab service is
already running for the ledger, the run does not compete for the hardware: it sends ``start`` to that
service through the ledger and follows the campaign's events from there (Ctrl-C then sends pause and
abort the same way).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from epiconsole.engine.events import EngineEvent
from epiconsole.errors import UserError
from epiconsole.sim.lab import tuned_config

PRINTED = ("campaign", "stage", "suspended", "resumed", "verdict", "result")
TERMINAL = ("finished", "aborted", "failed")
EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_ABORTED = 0, 1, 2, 3

#: Rough lab-time costs of the configuration stages on the real lab (seconds), for ``--dry-run``.
STAGE_ESTIMATE_S = {"surgery": 900.0, "validate": 300.0, "convert": 1200.0, "deploy": 300.0}
#: Items of the full default tasks (when ``benchmark.limit`` is 0).
TASK_SIZES = {"mmlu": 14042, "arc_challenge": 1172, "hellaswag": 10042}
#: Assumed mean prompt length per request (tokens), for the estimate only.
PROMPT_TOKENS_PER_SHOT = 110


@dataclass(frozen=True)
class RunOptions:
    only: tuple[str, ...] = ()
    reps: int | None = None
    resume: bool = False
    json: bool = False
    dry_run: bool = False
    sim: bool = False
    sim_dir: str | None = None


# ------------------------------------------------------------------------------------ simulated


# The simulated lab's tuning lives with the simulated lab; re-exported here for the run/service commands.
sim_config = tuned_config


def sim_dir_for(cfg: Any, explicit: str | None) -> Path:
    """Where the embedded simulated lab keeps its machines' files: beside the ledger, so a resume finds
    the models it built before."""
    if explicit:
        return Path(explicit).expanduser()
    return cfg.ledger_path().with_name(cfg.ledger_path().stem + "-simlab")


class SimProcess:
    """The simulated lab in a child process (``epiconsole sim``), as its own machines would be.

    In a process of its own the simulated meter, SSH servers and API do not share an interpreter (and
    its GIL) with the service that measures them: a busy benchmark thread here cannot stall the
    simulated board's writes, and the board's CPU cannot stall the meter's reader. The child dies with
    its parent (``PR_SET_PDEATHSIG``), even when the parent is SIGKILLed.
    """

    def __init__(self, cfg: Any, directory: Path, start_timeout_s: float = 120.0) -> None:
        self.cfg = cfg
        self.dir = directory
        self.start_timeout_s = start_timeout_s
        self.proc: asyncio.subprocess.Process | None = None
        self.config: Any = None

    async def __aenter__(self) -> Any:
        from epiconsole import config as cfgmod

        self.dir.mkdir(parents=True, exist_ok=True)
        await _wait_stale(self.dir / "sim.pid")
        base_path = self.dir / "base.toml"
        base_path.write_text("# The simulated lab's base config (written by epiconsole run --sim).\n"
                             + cfgmod.dumps(self.cfg))
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "epiconsole", "sim", "--config", str(base_path), "--dir", str(self.dir),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, preexec_fn=_die_with_parent,
        )
        (self.dir / "sim.pid").write_text(f"{self.proc.pid}\n")
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), self.start_timeout_s)
        except TimeoutError:
            line = b""
        if not line.strip():
            err = b""
            await self._stop()
            if self.proc.stderr is not None:
                err = await self.proc.stderr.read()
            tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise UserError(f"the simulated lab did not start: {tail[0]}")
        self.config = sim_config(cfgmod.load_file(line.decode().strip()))
        return self.config

    async def __aexit__(self, *exc: object) -> None:
        await self._stop()

    async def _stop(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 15.0)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _wait_stale(pid_file: Path, timeout_s: float = 15.0) -> None:
    """A simulated lab left from a crashed run still shuts down (it got SIGTERM when its parent died):
    let it finish before a new one uses the same directory."""
    import os

    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:  # another user's process with a recycled pid: not ours
            return
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"epiconsole" not in f.read():
                    return
        except OSError:
            return
        await asyncio.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


# -------------------------------------------------------------------------------------- printing


class Printer:
    """Turns engine events into output lines (JSON, plain or rich)."""

    def __init__(self, out: TextIO, mode: str) -> None:
        self.out = out
        self.mode = mode
        self._progress: Any = None
        self._task: Any = None
        self.total = 0
        self.done = 0

    def start(self) -> None:
        if self.mode == "rich":
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            console = Console(file=self.out)
            self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("{task.fields[stage]}"), console=console,
                                      transient=False)
            self._progress.start()
            self._task = self._progress.add_task("repetitions", total=None, stage="")

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def note(self, text: str) -> None:
        if self.mode == "json":
            return
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            print(text, file=self.out, flush=True)

    def __call__(self, ev: EngineEvent) -> None:
        if ev.event not in PRINTED:
            return
        d = ev.data
        if ev.event == "campaign" and "trials_total" in d:
            self.total, self.done = int(d["trials_total"]), int(d.get("trials_done", 0))
        if ev.event == "result" or (ev.event == "verdict" and d.get("status") in ("failed", "skipped")):
            self.done += 1
        if self.mode == "json":
            print(json.dumps(ev.to_json(), default=str), file=self.out, flush=True)
            return
        if self.mode == "rich" and self._progress is not None:
            stage = f"{d.get('config_id', '')} rep {d.get('rep', '')}: {d.get('stage', '')}" if "stage" in d else ""
            self._progress.update(self._task, total=self.total or None, completed=self.done,
                                  **({"stage": stage} if stage else {}))
            if ev.event != "stage" or d.get("status") in ("failed", "discarded"):
                self._progress.console.print(self._line(ev))
            return
        if ev.event == "stage" and d.get("status") == "started":
            return  # plain output: one line per finished stage is enough
        print(self._line(ev), file=self.out, flush=True)

    def _line(self, ev: EngineEvent) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(ev.t))
        count = f"[{self.done}/{self.total}] " if self.total else ""
        return f"{stamp} {count}{ev.message}"


def output_mode(opts: RunOptions, out: TextIO) -> str:
    if opts.json:
        return "json"
    return "rich" if getattr(out, "isatty", lambda: False)() else "plain"


def exit_code(status: str | None, summary: dict[str, Any]) -> int:
    if status == "aborted":
        return EXIT_ABORTED
    if status != "finished":
        return EXIT_INVALID
    trials = int(summary.get("trials", 0))
    return EXIT_OK if trials and int(summary.get("valid", 0)) == trials else EXIT_INVALID


# -------------------------------------------------------------------------------------- dry run


def estimate(cfg: Any, plan: Any) -> dict[str, Any]:
    """Expected duration of ``plan`` in lab seconds and (for the simulated lab) real seconds. Rough."""
    th, bench = cfg.thresholds, cfg.benchmark
    requests = 0
    prompt_tokens = 0
    for t in bench.tasks:
        n = bench.limit or next((v for k, v in TASK_SIZES.items() if t.name.startswith(k)), 1000)
        requests += n
        prompt_tokens += n * PROMPT_TOKENS_PER_SHOT * (t.shots + 1)
    # Throughput of the 4-node cluster (DESIGN.md §2 figures for Qwen3-30B-A3B, q40).
    bench_s = prompt_tokens / 42.0 + requests * bench.max_tokens / 13.5
    per_rep = max(th.stabilize_min_s, th.stabilize_window_s) + bench_s
    config_s = 0.0
    for c in plan.configurations:
        config_s += sum(STAGE_ESTIMATE_S.get(s, 0.0) for s in c.stages)
    lab_s = config_s + per_rep * len(plan.configurations) * plan.repetitions
    scale = cfg.sim.time_scale if cfg.simulated else 1.0
    return {"lab_seconds": round(lab_s), "real_seconds": round(lab_s / scale), "requests_per_rep": requests,
            "benchmark_seconds_per_rep": round(bench_s), "time_scale": scale}


def dry_run(cfg: Any, plan: Any, out: TextIO, as_json: bool) -> int:
    est = estimate(cfg, plan)
    if as_json:
        print(json.dumps({"event": "plan", "plan": plan.to_dict(), "estimate": est, "simulated": cfg.simulated}),
              file=out)
        return EXIT_OK
    print(f"plan {plan.name}: {len(plan.configurations)} configurations x {plan.repetitions} repetitions"
          f"{' (simulated lab)' if cfg.simulated else ''}", file=out)
    for c in plan.configurations:
        print(f"  {c.order:>2}  {c.id:<16} {c.label:<28} {' > '.join(c.stages)}", file=out)
    hours = est["real_seconds"] / 3600
    note = f" ({est['lab_seconds'] / 3600:.1f} h of lab time at x{est['time_scale']:g})" if cfg.simulated else ""
    print(f"expected duration: about {hours:.1f} h{note}; {est['requests_per_rep']} benchmark requests per "
          f"repetition; nothing was started", file=out)
    return EXIT_OK


# ------------------------------------------------------------------------------------------- run


def _plan(cfg: Any, opts: RunOptions) -> Any:
    from epiconsole import matrix

    plan = matrix.plan_for(cfg)
    if opts.only:
        plan = plan.only(list(opts.only))
    if opts.reps:
        plan = plan.with_repetitions(opts.reps)
    return plan


def _sigint(loop: asyncio.AbstractEventLoop, pause: Callable[[], Any], abort: Callable[[], Any],
            note: Callable[[str], None]) -> Callable[[], None]:
    count = [0]

    def handler() -> None:
        count[0] += 1
        if count[0] == 1:
            note("pausing at the next stage boundary (Ctrl-C again aborts)")
            loop.create_task(_call(pause))
        else:
            note("aborting: the current measurement is discarded")
            loop.create_task(_call(abort))

    return handler


async def _call(fn: Callable[[], Any]) -> None:
    r = fn()
    if asyncio.iscoroutine(r):
        await r


async def run(base: Any, opts: RunOptions, out: TextIO | None = None) -> int:
    """Run a campaign headless; returns the exit code."""
    from epiconsole.service import LabService, ServiceLock

    out = out or sys.stdout
    cfg = sim_config(base) if opts.sim else base
    plan = _plan(cfg, opts)  # usage errors (--only, --reps) surface before anything starts
    if opts.dry_run:
        return dry_run(cfg, plan, out, opts.json)
    printer = Printer(out, output_mode(opts, out))
    holder = ServiceLock.holder(cfg.ledger_path())
    if holder is not None:
        return await follow(cfg, opts, printer, holder)
    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as stack:
        if opts.sim:
            cfg = await stack.enter_async_context(SimProcess(cfg, sim_dir_for(cfg, opts.sim_dir)))
        service = LabService(cfg)
        service.listeners.append(printer)
        await service.start()
        stack.push_async_callback(service.stop)
        printer.start()
        stack.callback(printer.stop)
        await service.start_campaign(only=list(opts.only) or None, reps=opts.reps, resume=opts.resume)
        engine = service.engine
        loop.add_signal_handler(signal.SIGINT, _sigint(loop, engine.pause, engine.abort, printer.note))
        stack.callback(loop.remove_signal_handler, signal.SIGINT)
        status = await service.wait_campaign()
        summary = await engine.summary()
    return exit_code(status, summary)


async def follow(cfg: Any, opts: RunOptions, printer: Printer, pid: int, poll_s: float = 0.2) -> int:
    """Start the campaign through the running service and follow its events from the ledger."""
    from epiconsole.ledger import Ledger
    from epiconsole.live import LiveSnapshot

    ledger = await Ledger.open(cfg.ledger_path(), readonly=True)
    try:
        last = (await ledger.last_events(1) or [None])[-1]
        after = last.id if last else 0
        cid = await ledger.put_command("start", {"only": list(opts.only), "reps": opts.reps or 0,
                                                 "resume": opts.resume})
        cmd = await ledger.wait_command(cid, timeout_s=30.0)
        if cmd is None:
            raise UserError(f"the lab service (pid {pid}) did not answer within 30 s; check it with epiconsole status")
        result = cmd.result or {}
        campaign_id = result.get("campaign_id")
        if not cmd.ok and campaign_id is None:
            raise UserError(f"the lab service refused to start: {result.get('message', 'no reason given')}")
        printer.note(f"following campaign {campaign_id} run by the lab service (pid {pid}): "
                     f"{result.get('message', '')}")
        loop = asyncio.get_running_loop()

        async def send(verb: str) -> None:
            await ledger.put_command(verb, {})

        loop.add_signal_handler(signal.SIGINT, _sigint(loop, lambda: send("pause"), lambda: send("abort"),
                                                       printer.note))
        printer.start()
        try:
            while True:
                for e in await ledger.events_after(after, 1000):
                    after = e.id
                    ev = EngineEvent.from_ledger(e.kind, e.message, e.data, e.t)
                    if ev is None or ev.data.get("campaign_id") != campaign_id:
                        continue
                    printer(ev)
                    if ev.event == "campaign" and ev.data.get("status") in TERMINAL:
                        return exit_code(ev.data["status"], ev.data)
                live = LiveSnapshot.from_live({k: v.value for k, v in (await ledger.get_live()).items()})
                if not live.service.alive():
                    printer.note("the lab service stopped; run again with --resume to continue the campaign")
                    return EXIT_INVALID
                await asyncio.sleep(poll_s)
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            printer.stop()
    finally:
        await ledger.close()
