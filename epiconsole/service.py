"""The lab service: the single owner of the hardware and the only writer of the ledger.

``LabService(cfg)`` runs in-process (``epiconsole run --headless`` and the TUI embed it) or as
``epiconsole service`` (until SIGTERM/SIGINT, for systemd). While it runs it

* holds an exclusive ``flock`` on ``<ledger>.lock`` (a second service for the same ledger is refused
  with the pid of the first; the kernel drops the lock when the process dies, even by SIGKILL),
* ingests the meter continuously (:mod:`epiconsole.telemetry`) and polls node health
  (:class:`epiconsole.engine.monitor.Monitor`),
* publishes the live sections of :mod:`epiconsole.live` a few times per second (with a heartbeat),
* executes the commands viewers put in the ledger (:data:`epiconsole.live.COMMANDS`) and records each
  outcome, and runs campaigns with the :class:`~epiconsole.engine.Engine`.

Stopping the service mid-campaign leaves the campaign unfinished; the next start with ``resume``
continues it at the first unfinished stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import epiconsole
from epiconsole.clock import Clock
from epiconsole.engine.events import Listener
from epiconsole.errors import UserError
from epiconsole.live import AmbientLive, MeterLive, NodeLive, NodesLive, ServiceLive

log = logging.getLogger(__name__)


class ServiceRunning(UserError):
    """Another lab service holds the ledger."""


class ServiceLock:
    """An exclusive ``flock`` beside the ledger, holding the owner's pid."""

    def __init__(self, ledger_path: Path) -> None:
        self.path = Path(str(ledger_path) + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            who = f"pid {pid}" if pid else "another process"
            raise ServiceRunning(
                f"a lab service is already running ({who}) for {str(self.path)[:-5]}; "
                "use it (epiconsole status, or the console) or stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    @staticmethod
    def holder(ledger_path: Path) -> int | None:
        """The pid of the service holding ``ledger_path`` (0 if unknown), or None when none does."""
        path = Path(str(ledger_path) + ".lock")
        if not path.exists():
            return None
        fd = os.open(path, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _read_pid(fd) or 0
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)


def _read_pid(fd: int) -> int:
    try:
        text = os.pread(fd, 64, 0).decode().strip()
        return int(text) if text else 0
    except (OSError, ValueError):
        return 0


class LabService:
    """See the module docstring. ``await start()``, then ``await start_campaign(...)``; ``await stop()``."""

    def __init__(self, cfg: Any, *, publish_s: float = 0.25, command_poll_s: float = 0.2,
                 flush_s: float = 0.1) -> None:
        self.cfg = cfg
        self.clock = Clock.for_config(cfg)
        self.publish_s = publish_s
        self.command_poll_s = command_poll_s
        self.flush_s = flush_s
        self.ledger_path = cfg.ledger_path()
        self.lock = ServiceLock(self.ledger_path)
        self.ledger: Any = None
        self.meter: Any = None
        self.telemetry: Any = None
        self.pool: Any = None
        self.cluster: Any = None
        self.surgeon: Any = None
        self.monitor: Any = None
        self.actions: Any = None
        self.engine: Any = None
        self.listeners: list[Listener] = []
        self._engine_task: asyncio.Task[str] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._started = 0.0
        self._api_ok: bool | None = None
        self._api_model = ""
        self._api_checked = 0.0
        self._running = False

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        from epiconsole import labdrivers
        from epiconsole.engine.lab import LabActions
        from epiconsole.engine.monitor import Monitor
        from epiconsole.ledger import Ledger
        from epiconsole.telemetry import Telemetry

        cfg = self.cfg
        self.lock.acquire()
        try:
            self.ledger = await Ledger.open(self.ledger_path)
            self.meter = labdrivers.meter(cfg)
            await self.meter.start()
            self.telemetry = Telemetry(self.ledger, self.meter, cfg.meter.channels, flush_s=self.flush_s,
                                       silent_after_s=cfg.meter.silent_after_s,
                                       retention_h=cfg.thresholds.retention_h)
            await self.telemetry.start()
            self.pool = labdrivers.ssh_pool(cfg)
            self.cluster = labdrivers.cluster(cfg, self.pool)
            self.surgeon = labdrivers.surgeon(cfg, self.pool)
            self.monitor = Monitor(cfg, self.cluster, self.telemetry, self.clock)
            await self.monitor.start()
            self.actions = LabActions(cfg, self.ledger, self.cluster, self.surgeon, self.telemetry, self.monitor,
                                      self.clock)
        except BaseException:
            await self._close_parts()
            raise
        self._started = time.time()
        self._running = True
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._meter_setup(), name="meter setup"),
            loop.create_task(self._publisher(), name="live publisher"),
            loop.create_task(self._commands(), name="command loop"),
        ]
        await self.ledger.event("service.started", f"lab service started (pid {os.getpid()}, {cfg.lab.name})",
                                data={"pid": os.getpid(), "simulated": cfg.simulated, "config": cfg.source})
        await self._publish()

    async def stop(self) -> None:
        """Stop everything; a running campaign stays unfinished (resumable)."""
        if not self._running:
            return
        self._running = False
        if self._engine_task is not None and not self._engine_task.done():
            self._engine_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._engine_task
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        with contextlib.suppress(Exception):
            await self.ledger.event("service.stopped", "lab service stopped", data={"pid": os.getpid()})
        await self._close_parts(final_live=True)

    async def _close_parts(self, final_live: bool = False) -> None:
        if self.monitor is not None:
            await self.monitor.stop()
        if self.telemetry is not None:
            with contextlib.suppress(Exception):
                await self.telemetry.stop()
        if self.meter is not None:
            await self.meter.close()
        if self.pool is not None:
            await self.pool.close()
        if self.ledger is not None:
            if final_live:
                with contextlib.suppress(Exception):
                    await self.ledger.set_live("service", ServiceLive().to_dict())
                    run = self.engine.run_live() if self.engine else None
                    if run is not None:
                        await self.ledger.set_live("run", dataclasses.replace(
                            run, state="idle" if run.state not in ("finished", "aborted", "failed") else run.state
                        ).to_dict())
            await self.ledger.close()
            self.ledger = None
        self.lock.release()

    async def __aenter__(self) -> LabService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _meter_setup(self) -> None:
        """Once connected, ask for the configured rate and the info line (and again after a reconnect)."""
        seen = -1
        while True:
            status = self.meter.status()
            if status.connected and status.reconnects != seen:
                try:
                    await self.meter.set_rate(self.cfg.meter.rate_hz, timeout=2.0)
                    self.telemetry.info = await self.meter.info(timeout=2.0)
                    seen = status.reconnects
                except Exception as exc:  # the board may be rebooting; try again shortly
                    log.info("meter setup: %s", exc)
            await asyncio.sleep(0.5)

    # ------------------------------------------------------------------------------ campaigns

    @property
    def campaign_running(self) -> bool:
        return self._engine_task is not None and not self._engine_task.done()

    async def start_campaign(self, *, only: list[str] | None = None, reps: int | None = None,
                             resume: bool = False, campaign_id: int | None = None) -> int:
        """Open (or resume) a campaign and run it in the background; returns its id."""
        from epiconsole import matrix
        from epiconsole.engine import Engine

        if self.campaign_running:
            raise UserError("a campaign is already running; pause or abort it first")
        plan = matrix.plan_for(self.cfg)
        if only:
            plan = plan.only(list(only))
        if reps:
            plan = plan.with_repetitions(int(reps))
        engine = Engine(self.ledger, self.cfg, self.actions, clock=self.clock, notify=self._notify)
        engine.listeners.extend(self.listeners)
        if campaign_id is not None:
            cid = await engine.reopen(campaign_id)
        else:
            cid = await engine.open(plan, resume=resume)
        self.engine = engine
        self._engine_task = asyncio.get_running_loop().create_task(engine.run(), name=f"campaign {cid}")
        return cid

    async def wait_campaign(self) -> str | None:
        """Wait for the running campaign to end; its exit status."""
        if self._engine_task is None:
            return None
        return await asyncio.shield(self._engine_task)

    async def _notify(self, payload: dict[str, Any]) -> None:
        try:
            from epiconsole import notify
        except ImportError:  # the notifier module is optional for the engine
            return
        data = dict(payload)
        kind = data.pop("event")
        event = notify.make_event(kind, campaign_id=data.pop("campaign_id", None),
                                  simulated=bool(data.pop("simulated", False)), t=data.pop("t", None),
                                  message=str(data.pop("message", "")), **data)

        async def warn(text: str) -> None:
            await self.ledger.event("notify.failed", text, "warning")

        failures: list[str] = []
        await notify.send(self.cfg.notify, event, log=failures.append)
        for f in failures:
            await warn(f)

    # ------------------------------------------------------------------------------- commands

    async def _commands(self) -> None:
        while True:
            try:
                for cmd in await self.ledger.pending_commands():
                    ok, result = await self.execute(cmd.verb, cmd.args)
                    await self.ledger.complete_command(cmd.id, ok, result)
                    await self.ledger.event("command", f"{cmd.verb}: {result.get('message', '')}",
                                            "info" if ok else "warning",
                                            {"id": cmd.id, "verb": cmd.verb, "args": cmd.args, "ok": ok, **result})
            except Exception:
                log.exception("command loop failed")
            await asyncio.sleep(self.command_poll_s)

    async def execute(self, verb: str, args: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        """Run one viewer command; (ok, result) where result has a ``message``."""
        from drivers.ssh import SshError

        eng = self.engine
        running = self.campaign_running
        try:
            if verb == "start":
                if running:
                    return False, {"message": "a campaign is already running", "campaign_id": eng.campaign_id}
                cid = await self.start_campaign(only=args.get("only") or None, reps=args.get("reps") or None,
                                                resume=bool(args.get("resume", False)))
                return True, {"message": f"campaign {cid} started", "campaign_id": cid}
            if verb in ("pause", "resume", "abort"):
                if not running:
                    return False, {"message": "no campaign is running"}
                return True, {"message": getattr(eng, verb)(), "campaign_id": eng.campaign_id}
            if verb == "skip":
                if not running:
                    return False, {"message": "no campaign is running"}
                return True, {"message": eng.skip(str(args["config_id"]))}
            if verb == "retry":
                config_id = str(args["config_id"])
                if running:
                    n = await eng.retry(config_id)
                    return True, {"message": f"{n} repetition(s) of {config_id} queued again"}
                latest = await self.ledger.latest_campaign()
                if latest is None:
                    return False, {"message": "there is no campaign to retry in"}
                from epiconsole.engine import Engine

                probe = Engine(self.ledger, self.cfg, self.actions, clock=self.clock)
                await probe.reopen(latest.id)
                n = await probe.retry(config_id)
                if not n:
                    return False, {"message": f"{config_id} has nothing to retry"}
                cid = await self.start_campaign(campaign_id=latest.id)
                return True, {"message": f"{n} repetition(s) of {config_id} queued again", "campaign_id": cid}
            if verb == "set_governor":
                await self.cluster.set_governor(str(args["node"]), str(args["governor"]))
                return True, {"message": f"{args['node']} governor set to {args['governor']}"}
            if verb == "restart_worker":
                node = str(args["node"])
                await self.pool.run(node, self.cluster.command("stop_worker"), check=True)
                await self.pool.run(node, self.cluster.command("start_worker", port=self.cluster.worker_port,
                                                                   nthreads=self.cluster.nthreads), check=True)
                return True, {"message": f"worker restarted on {node}"}
            if verb == "restart_root":
                if eng is None or eng._deployed is None:
                    return False, {"message": "no model is deployed by this service yet"}
                config = eng.plan.get(eng._deployed)
                model, tok = self.actions.model_files(config)
                dest = self.cfg.cluster.model_dir
                await self.cluster.stop_root()
                await self.cluster.start_root(f"{dest}/{Path(model).name}", f"{dest}/{Path(tok).name}")
                return True, {"message": "root restarted"}
            return False, {"message": f"unknown command {verb!r}"}
        except (KeyError, ValueError) as exc:
            return False, {"message": f"bad arguments for {verb}: {exc}"}
        except (UserError, SshError) as exc:
            return False, {"message": str(exc)}

    # ----------------------------------------------------------------------------------- live

    async def _publisher(self) -> None:
        while True:
            await asyncio.sleep(self.publish_s)
            try:
                await self._publish()
            except Exception:
                log.exception("live publish failed")

    async def _check_api(self) -> None:
        """Probe /v1/models now and then, never while a benchmark holds the one-at-a-time API."""
        now = time.monotonic()
        stage = self.engine.run_live().stage if self.engine else ""
        if now - self._api_checked < 2.0 or stage == "benchmark":
            return
        self._api_checked = now
        models = await self.actions._api_models()
        self._api_ok = bool(models)
        self._api_model = models[0] if models else ""

    async def _publish(self) -> None:
        cfg = self.cfg
        now = time.time()
        await self._check_api()
        service = ServiceLive(pid=os.getpid(), host=socket.gethostname(), started=self._started, heartbeat=now,
                              config_path=cfg.source, lab_name=cfg.lab.name, simulated=cfg.simulated,
                              version=epiconsole.__version__)
        st = self.meter.status()
        info = self.telemetry.info or st.info
        meter = MeterLive(
            connected=st.connected, port=st.port, rate_hz=float(info.rate_hz) if info else 0.0,
            firmware=info.fw if info else "", serial=info.serial if info else "",
            cal_date=info.cal_date if info else "", uncertainty_pct=float(info.uncertainty_pct) if info else 0.0,
            good_lines=st.good, bad_lines=st.bad_total, lost_lines=st.lost, reboots=st.reboots,
            reconnects=st.reconnects, fit_residual_ms=(st.clock_residual or 0.0) * 1000.0,
            last_sample=st.last_sample_host_time if st.last_sample_host_time == st.last_sample_host_time else 0.0,
        )
        figures = self.telemetry.node_figures()
        health = self.monitor.nodes_live()
        nodes: dict[str, NodeLive] = {}
        cluster_w = 0.0
        have_w = False
        for node in cfg.cluster.nodes:
            f = figures.get(node, {})
            h = health.get(node, {})
            if f.get("W") is not None:
                cluster_w += f["W"]
                have_w = True
            nodes[node] = NodeLive(name=node, role="root" if node == cfg.cluster.root else "worker",
                                   **{k: v for k, v in f.items()}, **h)
        nodes_live = NodesLive(nodes=nodes, api_ok=self._api_ok, api_model=self._api_model,
                               cluster_W=cluster_w if have_w else None)
        th = cfg.thresholds
        amb = self.monitor.ambient
        ambient = AmbientLive(temp_c=amb, time=self.monitor.ambient_t,
                              in_band=None if amb is None else abs(amb - th.ambient_c) <= th.ambient_tol_c)
        sections: dict[str, dict[str, Any]] = {"service": service.to_dict(), "meter": meter.to_dict(),
                                               "nodes": nodes_live.to_dict(), "ambient": ambient.to_dict()}
        if self.engine is not None:
            run = self.engine.run_live()
            joules = self.telemetry.window_joules() if run.window_start else None
            tokens = self.actions.live_tokens if run.window_start else 0
            run = dataclasses.replace(run, window_joules=joules, window_tokens=tokens,
                                      live_jpt=(joules / tokens) if joules is not None and tokens else None)
            sections["run"] = run.to_dict()
        async with self.ledger.transaction():
            for key, value in sections.items():
                await self.ledger.set_live(key, value)
