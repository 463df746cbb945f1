"""The run engine: walks a plan's configurations x repetitions through the stages of DESIGN.md §3.

Durability. Every stage transition is a checkpoint in the ledger (``started``, then ``done``,
``failed`` or ``discarded``). Results are written together with their stage's ``done`` checkpoint in
one transaction (``put_benchmark``/``put_epi``; the ``log`` stage writes provenance, the verdict and its
checkpoint in one transaction), so after a crash the next start resumes at the first unfinished stage
and no result is ever duplicated or lost. Configuration stages (surgery, validate, convert, deploy) are
checkpointed on the configuration's first repetition. A measurement (stabilize + benchmark) that did not
finish is redone from ``stabilize``: after a crash or a suspender trip the cluster's thermal state is
unknown, so a half-measured window is never continued. After a restart the engine asks the lab whether
the configuration is still deployed and redeploys when it is not.

Control. Pause is deferred to the next stage boundary; abort interrupts the current stage (its
measurement is discarded) and finishes the campaign with ``exit_status = aborted``; skip drops a
configuration (interrupting it when it is the one running); retry puts a failed, invalid or skipped
configuration's repetitions back in the queue. Suspenders interrupt measurement stages only (see
:mod:`epiconsole.engine.suspenders`); the run goes on by itself once the lab has settled.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

from epiconsole.clock import Clock
from epiconsole.engine.actions import StageActions, StageError, Window
from epiconsole.engine.events import EngineEvent, Listener
from epiconsole.engine.provenance import campaign_provenance, software
from epiconsole.engine.suspenders import Suspenders
from epiconsole.ledger import Ledger, Trial
from epiconsole.live import RunLive, RunState
from epiconsole.matrix import CONFIG_STAGES, REP_STAGES, Configuration, Plan

log = logging.getLogger(__name__)

#: Exit statuses a campaign can end with (``campaigns.exit_status``).
FINISHED, ABORTED, FAILED, INTERRUPTED = "finished", "aborted", "failed", "interrupted"


class _Interrupt(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Aborted(_Interrupt):
    pass


class _Suspended(_Interrupt):
    pass


class _Skipped(_Interrupt):
    pass


class _Redo(_Interrupt):
    pass


class _StageFailed(Exception):
    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"{stage} failed: {message}")
        self.stage = stage
        self.message = message


#: Configuration stages that run on the DGX only, so they can run while another configuration is measured.
BUILD_STAGES = ("surgery", "validate", "convert")


def _quiet(value: float | None, message: str = "") -> None:
    """Progress of a background stage: not shown (the live view follows the foreground stage)."""


def plan_from_stored(data: dict[str, Any]) -> Plan:
    """The plan a campaign stored (``Plan.to_dict``), so a resume runs exactly what was started."""
    fields = {f.name for f in dataclasses.fields(Configuration)}
    configs = tuple(Configuration(**{k: v for k, v in c.items() if k in fields}) for c in data["configurations"])
    return Plan(
        name=data["name"],
        description=data.get("description", ""),
        repetitions=int(data["repetitions"]),
        configurations=configs,
        layers=int(data.get("layers", 0)),
        early_fraction=float(data.get("early_fraction", 0.25)),
    )


Notifier = Callable[[dict[str, Any]], Awaitable[Any]]


class Engine:
    """Runs one campaign at a time against :class:`StageActions`, writing everything to the ledger."""

    def __init__(
        self,
        ledger: Ledger,
        cfg: Any,
        actions: StageActions,
        *,
        clock: Clock | None = None,
        notify: Notifier | None = None,
        measure_attempts: int = 3,
        trip_grace_s: float = 1.5,
    ) -> None:
        self.ledger = ledger
        self.cfg = cfg
        self.actions = actions
        self.clock = clock or Clock.for_config(cfg)
        self.notify = notify
        self.measure_attempts = measure_attempts
        self.trip_grace_s = trip_grace_s
        self.suspenders = Suspenders(actions.conditions, self.clock, cfg.thresholds.suspender_settle_s)
        self.listeners: list[Listener] = []
        self.plan: Plan | None = None
        self.campaign_id: int | None = None
        self.exit_status: str | None = None
        # control
        self._pause_requested = False
        self._resume = asyncio.Event()
        self._abort = asyncio.Event()
        self._skip: set[str] = set()
        self._skip_events: dict[str, asyncio.Event] = {}  # wake a running stage of a skipped configuration
        #: The next configuration's DGX stages, built while this one is measured (see _prefetch).
        self._build: tuple[str, asyncio.Task[None]] | None = None
        # state for viewers
        self._state: RunState = "idle"
        self._config_id = ""
        self._rep = 0
        self._stage_name = ""
        self._stage_started = 0.0
        self._progress: float | None = None
        self._message = ""
        self._suspender = ""
        self._suspended_since = 0.0
        self._window_start = 0.0
        self._trials_total = 0
        self._trials_done = 0
        self._trial_seconds: list[float] = []
        self._deployed: str | None = None
        self._deploy_data: dict[str, Any] = {}
        self._prepared: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------ control

    @property
    def state(self) -> RunState:
        return self._state

    def pause(self) -> str:
        """Pause at the next stage boundary."""
        if self._state in ("idle", "finished", "failed", "aborted"):
            return "no campaign is running"
        self._pause_requested = True
        self._resume.clear()
        if self._state == "running":
            self._state = "pausing"
        return "pausing at the next stage boundary"

    def resume(self) -> str:
        if not self._pause_requested:
            return "not paused"
        self._pause_requested = False
        self._resume.set()
        if self._state == "pausing":
            self._state = "running"
        return "resumed"

    def abort(self) -> str:
        if self._state in ("idle", "finished", "failed", "aborted"):
            return "no campaign is running"
        self._abort.set()
        self._resume.set()
        self._state = "aborting"
        return "aborting: the current measurement is discarded"

    def skip(self, config_id: str) -> str:
        if self.plan is None:
            return "no campaign is running"
        self.plan.get(config_id)  # KeyError for an unknown id
        self._skip.add(config_id)
        self._skip_event(config_id).set()
        return f"skipping {config_id}"

    def _skip_event(self, config_id: str) -> asyncio.Event:
        return self._skip_events.setdefault(config_id, asyncio.Event())

    async def retry(self, config_id: str) -> int:
        """Queue a failed, invalid or skipped configuration again; returns the repetitions re-queued."""
        if self.campaign_id is None or self.plan is None:
            raise KeyError("no campaign")
        self.plan.get(config_id)
        self._skip.discard(config_id)
        self._skip_events.pop(config_id, None)
        n = 0
        for t in await self.ledger.trials(self.campaign_id):
            if t.config_id != config_id or t.status in ("pending", "running"):
                continue
            if t.status == "done" and t.valid:
                continue
            async with self.ledger.transaction():
                for stage in REP_STAGES:
                    await self.ledger.checkpoint(t.id, stage, "discarded", {"reason": "retry"})
                await self.ledger.set_trial(t.id, status="pending", valid=None, reasons=[])
            n += 1
        if n:
            await self._emit("campaign", f"{config_id}: {n} repetition(s) queued again", status="retry",
                             config_id=config_id, repetitions=n)
        return n

    # --------------------------------------------------------------------------------- live state

    def run_live(self) -> RunLive:
        eta = None
        remaining = self._trials_total - self._trials_done
        if self._trial_seconds and remaining > 0:
            eta = sum(self._trial_seconds) / len(self._trial_seconds) * remaining
        return RunLive(
            state=self._state,
            campaign_id=self.campaign_id,
            plan_name=self.plan.name if self.plan else "",
            config_id=self._config_id,
            repetition=self._rep,
            stage=self._stage_name,
            stage_started=self._stage_started,
            stage_progress=self._progress,
            trials_done=self._trials_done,
            trials_total=self._trials_total,
            eta_s=eta,
            window_start=self._window_start,
            suspender=self._suspender,
            suspended_since=self._suspended_since,
            message=self._message,
        )

    # ----------------------------------------------------------------------------------- events

    async def _emit(self, event: str, message: str, *, level: str = "info", trial_id: int | None = None,
                    **data: Any) -> None:
        ev = EngineEvent(event, {"campaign_id": self.campaign_id, **data}, time.time(), message)
        self._message = message
        for listener in list(self.listeners):
            try:
                listener(ev)
            except Exception:  # a broken listener must never stop a measurement
                log.exception("engine event listener failed")
        await self.ledger.event(ev.ledger_kind, message, level, ev.data, trial_id)

    async def _notify(self, kind: str, **data: Any) -> None:
        if self.notify is None:
            return
        payload = {"event": kind, "campaign_id": self.campaign_id, "plan": self.plan.name if self.plan else "",
                   "lab": self.cfg.lab.name, "simulated": self.cfg.simulated, "t": time.time(), **data}
        try:
            await asyncio.wait_for(self.notify(payload), self.cfg.notify.timeout_s + 5)
        except Exception:  # the notifier never stops a run
            log.exception("notifier failed")

    def _on_progress(self, value: float | None, message: str = "") -> None:
        self._progress = value
        if message:
            self._message = message

    # --------------------------------------------------------------------------------- campaign

    async def reopen(self, campaign_id: int) -> int:
        """Run campaign ``campaign_id`` again with its stored plan (after a retry put trials back)."""
        campaign = await self.ledger.campaign(campaign_id)
        if campaign is None:
            raise KeyError(f"no campaign {campaign_id}")
        self.plan = plan_from_stored(campaign.plan)
        self.campaign_id = campaign.id
        return await self._load_trials(resumed=True)

    async def open(self, plan: Plan, *, resume: bool = False) -> int:
        """Continue the latest unfinished campaign (``resume``) or start a new one with ``plan``."""
        latest = await self.ledger.latest_campaign()
        if resume and latest is not None and latest.finished_at is None:
            self.plan = plan_from_stored(latest.plan)
            self.campaign_id = latest.id
            resumed = True
        else:
            if latest is not None and latest.finished_at is None:
                await self.ledger.finish_campaign(latest.id, INTERRUPTED)
            self.plan = plan
            self.campaign_id = await self.ledger.create_campaign(
                plan.name, plan.to_dict(), self.cfg.digest(), self.cfg.simulated, campaign_provenance(self.cfg)
            )
            resumed = False
        return await self._load_trials(resumed)

    async def _load_trials(self, resumed: bool) -> int:
        assert self.plan is not None and self.campaign_id is not None
        rows = [
            {"config_id": c.id, "rep": r, "ord": c.order, "experts": c.experts, "target": c.target,
             "data": dataclasses.asdict(c)}
            for c, r in self.plan.trials()
        ]
        trials = await self.ledger.ensure_trials(self.campaign_id, rows)
        self._trials_total = len(trials)
        self._trials_done = sum(1 for t in trials if t.status not in ("pending", "running"))
        self._resumed = resumed
        return self.campaign_id

    async def run(self) -> str:
        """Run the opened campaign to its end; returns its exit status."""
        assert self.plan is not None and self.campaign_id is not None, "open() a campaign first"
        self._state = "running"
        status = FAILED
        try:
            verb = "resumed" if self._resumed else "started"
            await self._emit("campaign", f"campaign {self.campaign_id} {verb}: {self.plan.name}, "
                             f"{self._trials_total} repetitions ({self._trials_done} done)",
                             status=verb, plan=self.plan.name, trials_total=self._trials_total,
                             trials_done=self._trials_done, simulated=self.cfg.simulated)
            try:
                await self._loop()
            finally:
                await self._stop_build()
            status = FINISHED
        except _Aborted:
            status = ABORTED
        except asyncio.CancelledError:
            # The service is stopping: leave the campaign unfinished so the next start resumes it.
            self._state = "idle"
            raise
        except Exception as exc:
            log.exception("engine failed")
            await self._emit("campaign", f"campaign failed: {exc}", level="error", status=FAILED,
                             error=str(exc), traceback=traceback.format_exc())
            status = FAILED
        self.exit_status = status
        await self.ledger.finish_campaign(self.campaign_id, status)
        summary = await self.summary()
        self._state = "finished" if status == FINISHED else ("aborted" if status == ABORTED else "failed")
        self._stage_name = ""
        await self._emit("campaign", f"campaign {self.campaign_id} {status}: {summary['valid']} valid, "
                         f"{summary['invalid']} invalid, {summary['failed']} failed, {summary['skipped']} skipped",
                         status=status, **summary)
        await self._notify("campaign_finished" if status == FINISHED else "campaign_failed",
                           status=status, **summary)
        return status

    async def summary(self) -> dict[str, int]:
        assert self.campaign_id is not None
        trials = await self.ledger.trials(self.campaign_id)
        return {
            "trials": len(trials),
            "valid": sum(1 for t in trials if t.status == "done" and t.valid),
            "invalid": sum(1 for t in trials if t.status == "done" and t.valid is False),
            "failed": sum(1 for t in trials if t.status == "failed"),
            "skipped": sum(1 for t in trials if t.status == "skipped"),
            "pending": sum(1 for t in trials if t.status in ("pending", "running")),
        }

    async def _loop(self) -> None:
        assert self.plan is not None and self.campaign_id is not None
        while True:
            await self._boundary()
            trials = await self.ledger.trials(self.campaign_id)
            self._trials_done = sum(1 for t in trials if t.status not in ("pending", "running"))
            todo = [t for t in trials if t.status in ("pending", "running")]
            if not todo:
                return
            trial = todo[0]
            config = self.plan.get(trial.config_id)
            if config.id in self._skip:
                if self._build is not None and self._build[0] == config.id:
                    await self._stop_build()  # its build is of no use now (and must not block the next)
                await self._mark_config(trials, config.id, "skipped", "skipped by the operator")
                continue
            if self._prepared is None:
                self._prepared = await self.actions.prepare()
            try:
                if self._deployed != config.id:
                    anchor = next(t for t in trials if t.config_id == config.id)
                    await self._prepare_config(config, anchor)
                self._prefetch(trials, config)
                started = time.monotonic()
                await self._run_trial(trial, config)
                self._trial_seconds.append(time.monotonic() - started)
            except _Skipped:
                await self._mark_config(await self.ledger.trials(self.campaign_id), config.id, "skipped",
                                        "skipped by the operator")
            except _StageFailed as f:
                if f.stage in CONFIG_STAGES:
                    await self._mark_config(trials, config.id, "failed", str(f))
                else:
                    await self.ledger.set_trial(trial.id, status="failed", valid=False, reasons=[str(f)])
                    await self._emit("verdict", f"{config.id} rep {trial.rep}: failed ({f})", level="error",
                                     trial_id=trial.id, config_id=config.id, rep=trial.rep, valid=False,
                                     status="failed", reasons=[str(f)])

    async def _mark_config(self, trials: list[Trial], config_id: str, status: str, reason: str) -> None:
        if self._deployed == config_id and status == "failed":
            self._deployed = None
        for t in trials:
            if t.config_id == config_id and t.status in ("pending", "running"):
                await self.ledger.set_trial(t.id, status=status, valid=False if status == "failed" else None,
                                            reasons=[reason])
                await self._emit("verdict", f"{config_id} rep {t.rep}: {status} ({reason})",
                                 level="warning" if status == "skipped" else "error", trial_id=t.id,
                                 config_id=config_id, rep=t.rep, valid=False, status=status, reasons=[reason])

    async def _boundary(self) -> None:
        """A stage boundary: abort takes effect, and a requested pause waits here."""
        if self._abort.is_set():
            raise _Aborted("aborted by the operator")
        if self._pause_requested:
            self._state = "paused"
            await self._emit("campaign", "paused at a stage boundary", status="paused",
                             config_id=self._config_id, rep=self._rep)
            await self._resume.wait()
            if self._abort.is_set():
                raise _Aborted("aborted by the operator")
            self._state = "running"
            await self._emit("campaign", "running again", status="running")

    # ----------------------------------------------------------------------------------- stages

    async def _stage(
        self,
        trial: Trial,
        stage: str,
        fn: Callable[[], Awaitable[dict[str, Any]]],
        *,
        measurement: bool = False,
        commit: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
        accept: Callable[[dict[str, Any]], str] | None = None,
        background: bool = False,
    ) -> dict[str, Any]:
        """Run one stage with its checkpoints; interruptions discard it and raise.

        A ``background`` stage (the next configuration's build) leaves the live state to the stage in
        the foreground and waits out a pause silently.
        """
        if background:
            await self._wait_unpaused()
        else:
            await self._boundary()
        if trial.config_id in self._skip:
            raise _Skipped("skipped by the operator")
        ident = {"trial_id": trial.id, "config_id": trial.config_id, "rep": trial.rep, "stage": stage}
        started_at = time.time()
        if background:
            ident["background"] = True
        else:
            self._config_id, self._rep, self._stage_name = trial.config_id, trial.rep, stage
            self._stage_started = started_at
            self._progress = None
        await self.ledger.checkpoint(trial.id, stage, "started")
        await self._emit("stage", f"{trial.config_id} rep {trial.rep}: {stage}", status="started", **ident)
        task = asyncio.create_task(fn(), name=f"stage {stage} {trial.config_id}/{trial.rep}")
        watchers = [asyncio.create_task(self._abort.wait(), name="abort watch"),
                    asyncio.create_task(self._skip_event(trial.config_id).wait(), name="skip watch")]
        if measurement:
            watchers.append(asyncio.create_task(self.suspenders.wait_trip(), name="suspender watch"))
        try:
            await asyncio.wait([task, *watchers], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in watchers:
                w.cancel()
            for w in watchers:
                with contextlib.suppress(asyncio.CancelledError):
                    await w
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        elapsed = round(time.time() - started_at, 3)
        if task.done() and not task.cancelled() and task.exception() is None:
            result = task.result() or {}
            discard = accept(result) if accept else ""
            if discard:
                await self.ledger.checkpoint(trial.id, stage, "discarded", {"reason": discard})
                await self._emit("stage", f"{trial.config_id} rep {trial.rep}: {stage} discarded ({discard})",
                                 level="warning", status="discarded", reason=discard, seconds=elapsed, **ident)
                raise _Redo(discard)
            if commit is not None:
                await commit(result)
            else:
                await self.ledger.checkpoint(trial.id, stage, "done", result)
            await self._emit("stage", f"{trial.config_id} rep {trial.rep}: {stage} done", status="done",
                             seconds=elapsed, **ident)
            return result
        interrupt: _Interrupt | None = None
        if self._abort.is_set():
            interrupt = _Aborted("aborted by the operator")
        elif trial.config_id in self._skip:
            interrupt = _Skipped("skipped by the operator")
        elif measurement:
            reason = self.suspenders.reason()
            if not reason and task.done() and not task.cancelled():
                # A failing stage may be the first sign of a lab condition (a node just went down):
                # give the monitor a moment to see it before calling it a failure.
                with contextlib.suppress(TimeoutError):
                    reason = await asyncio.wait_for(self.suspenders.wait_trip(), self.trip_grace_s)
            if reason:
                interrupt = _Suspended(reason)
        if interrupt is not None:
            await self.ledger.checkpoint(trial.id, stage, "discarded", {"reason": interrupt.reason})
            await self._emit("stage", f"{trial.config_id} rep {trial.rep}: {stage} discarded ({interrupt.reason})",
                             level="warning", status="discarded", reason=interrupt.reason, seconds=elapsed, **ident)
            raise interrupt
        exc = task.exception() if task.done() and not task.cancelled() else None
        message = str(exc) if isinstance(exc, StageError) else f"{type(exc).__name__}: {exc}"
        data: dict[str, Any] = {"error": message}
        if exc is not None and not isinstance(exc, StageError):
            data["traceback"] = "".join(traceback.format_exception(exc))
        await self.ledger.checkpoint(trial.id, stage, "failed", data)
        await self._emit("stage", f"{trial.config_id} rep {trial.rep}: {stage} failed: {message}", level="error",
                         status="failed", error=message, seconds=elapsed, **ident)
        raise _StageFailed(stage, message)

    async def _prepare_config(self, config: Configuration, anchor: Trial) -> None:
        """Surgery .. deploy for ``config`` (resuming at the first unfinished one; checking a deployment)."""
        if self._build is not None and self._build[0] == config.id:
            task = self._build[1]
            self._build = None
            await task  # its stage failure or interruption is this configuration's
        stages = [s for s in config.stages if s in CONFIG_STAGES]
        latest = await self.ledger.stage_status(anchor.id)
        start = next((i for i, s in enumerate(stages) if latest.get(s) is None or latest[s].status != "done"), None)
        if start is None:
            data = latest["deploy"].data or {}
            if await self.actions.deployed(config, data):
                self._deployed, self._deploy_data = config.id, data
                return
            try:
                self._deploy_data = await self._stage(anchor, "deploy", self._action("deploy", config))
                self._deployed = config.id
                return
            except _StageFailed:
                start = 0  # the built model is gone too: build it again
        for stage in stages[start:]:
            data = await self._stage(anchor, stage, self._action(stage, config))
            if stage == "deploy":
                self._deploy_data = data
        self._deployed = config.id

    def _action(self, stage: str, config: Configuration, background: bool = False
                ) -> Callable[[], Awaitable[dict[str, Any]]]:
        progress = _quiet if background else self._on_progress
        return functools.partial(getattr(self.actions, stage), config, progress)

    # ---------------------------------------------------------------------------- prefetching

    def _prefetch(self, trials: list[Trial], current: Configuration) -> None:
        """Build the next configuration on the DGX (surgery, validate, convert) while this one is measured.

        The DGX is not metered and the cluster is not touched (deploy waits for its turn), so the
        measurements are unaffected; on the real lab this hides the DGX's hour per configuration. Each
        build stage is checkpointed as usual, so a crash resumes a half-built configuration too.
        """
        if self._build is not None:
            return
        assert self.plan is not None
        later = [t for t in trials if t.status in ("pending", "running") and t.config_id != current.id
                 and t.config_id not in self._skip]
        if not later:
            return
        nxt = self.plan.get(later[0].config_id)
        if not any(s in nxt.stages for s in BUILD_STAGES):
            return
        anchor = next(t for t in trials if t.config_id == nxt.id)
        task = asyncio.get_running_loop().create_task(self._build_stages(nxt, anchor), name=f"build {nxt.id}")
        self._build = (nxt.id, task)

    async def _build_stages(self, config: Configuration, anchor: Trial) -> None:
        latest = await self.ledger.stage_status(anchor.id)
        for stage in (s for s in config.stages if s in BUILD_STAGES):
            c = latest.get(stage)
            if c is None or c.status != "done":
                await self._stage(anchor, stage, self._action(stage, config, background=True), background=True)

    async def _stop_build(self) -> None:
        """Cancel a build in flight (the campaign ends or stops); its stage stays unfinished, to resume."""
        if self._build is None:
            return
        task = self._build[1]
        self._build = None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    async def _wait_unpaused(self) -> None:
        if self._abort.is_set():
            raise _Aborted("aborted by the operator")
        while self._pause_requested and not self._abort.is_set():
            await self._resume.wait()
        if self._abort.is_set():
            raise _Aborted("aborted by the operator")

    async def _run_trial(self, trial: Trial, config: Configuration) -> None:
        await self.ledger.set_trial(trial.id, status="running")
        redo = 0
        while True:
            latest = await self.ledger.stage_status(trial.id)

            def done(stage: str, latest: dict[str, Any] = latest) -> bool:
                c = latest.get(stage)
                return c is not None and c.status == "done"

            stored = {r.trial.id: r for r in await self.ledger.results(trial.campaign_id)}.get(trial.id)
            if not done("benchmark"):
                bench = await self._measure(trial, config)
            else:
                bench = (stored.benchmark if stored else None) or {}
            try:
                if not done("calculate"):
                    epi = await self._calculate(trial, config, bench, allow_redo=redo < self.measure_attempts - 1)
                else:
                    epi = (stored.epi if stored else None) or {}
            except _Redo as r:
                redo += 1
                await self.ledger.checkpoint(trial.id, "benchmark", "discarded", {"reason": r.reason})
                continue
            if not done("log"):
                await self._log(trial, config, bench, epi)
            return

    async def _measure(self, trial: Trial, config: Configuration) -> dict[str, Any]:
        """Stabilize + benchmark, redone after a suspender trip; returns the committed benchmark result."""
        failures = 0
        while True:
            reason = self.suspenders.reason()
            if reason:
                await self._suspend(trial, reason, time.time())
            try:
                await self._stage(trial, "stabilize", self._action("stabilize", config), measurement=True)
                return await self._stage(trial, "benchmark", functools.partial(self._benchmark, trial, config),
                                         measurement=True,
                                         commit=functools.partial(self._commit_benchmark, trial))
            except _Suspended as s:
                await self._suspend(trial, s.reason, time.time())
            except _StageFailed:
                failures += 1
                if failures >= self.measure_attempts:
                    raise

    async def _suspend(self, trial: Trial, reason: str, t0: float) -> None:
        self._state, self._suspender, self._suspended_since = "suspended", reason, t0
        await self._emit("suspended", f"suspended: {reason}; the measurement is discarded and redone",
                         level="warning", trial_id=trial.id, config_id=trial.config_id, rep=trial.rep,
                         reason=reason)
        await self._notify("suspended", reason=reason, config_id=trial.config_id, rep=trial.rep)

        def changed(r: str) -> None:
            self._suspender = r

        waiter = asyncio.create_task(self.suspenders.wait_clear(changed), name="suspender settle")
        aborted = asyncio.create_task(self._abort.wait(), name="abort watch")
        try:
            await asyncio.wait([waiter, aborted], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (waiter, aborted):
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        t1 = time.time()
        self.suspenders.record(reason, t0, t1)
        if self._abort.is_set():
            raise _Aborted("aborted by the operator")
        self._state = "pausing" if self._pause_requested else "running"
        self._suspender = ""
        await self._emit("resumed", f"resumed after {t1 - t0:.1f} s ({reason})", trial_id=trial.id,
                         config_id=trial.config_id, rep=trial.rep, reason=reason, seconds=round(t1 - t0, 3))
        await self._notify("resumed", reason=reason, seconds=t1 - t0)

    async def _benchmark(self, trial: Trial, config: Configuration) -> dict[str, Any]:
        t0 = time.time()
        await self.ledger.mark(trial.id, "begin", t0)
        self._window_start = t0
        self.actions.window_begin(t0)
        try:
            result = await self.actions.benchmark(config, self._on_progress)
        finally:
            self._window_start = 0.0
        t1 = time.time()
        await self.ledger.mark(trial.id, "end", t1)
        await self.actions.window_end(t1)
        return {**result, "window": {"t0": t0, "t1": t1}}

    async def _commit_benchmark(self, trial: Trial, result: dict[str, Any]) -> None:
        await self.ledger.put_benchmark(trial.id, result, stage_done="benchmark")

    async def _calculate(self, trial: Trial, config: Configuration, bench: dict[str, Any], *,
                         allow_redo: bool) -> dict[str, Any]:
        w = bench.get("window") or {}
        window = Window(trial.id, trial.config_id, trial.rep, float(w.get("t0", 0.0)), float(w.get("t1", 0.0)))

        def accept(epi: dict[str, Any]) -> str:
            reasons = (epi.get("validity") or {}).get("reasons") or []
            throttled = [r for r in reasons if "throttled" in r]
            if throttled and allow_redo and self.cfg.thresholds.on_throttle == "redo":
                return f"{throttled[0]}; redoing the measurement (on_throttle = redo)"
            return ""

        async def commit(epi: dict[str, Any]) -> None:
            await self.ledger.put_epi(trial.id, epi, stage_done="calculate")

        epi = await self._stage(trial, "calculate", functools.partial(self.actions.calculate, window, bench),
                                commit=commit, accept=accept)
        validity = epi.get("validity") or {}
        valid = bool(validity.get("valid"))
        reasons = list(validity.get("reasons") or [])
        verdict = "valid" if valid else "invalid: " + "; ".join(reasons)
        await self._emit("verdict", f"{trial.config_id} rep {trial.rep}: {verdict}",
                         level="info" if valid else "warning", trial_id=trial.id, config_id=trial.config_id,
                         rep=trial.rep, valid=valid, status="done", reasons=reasons)
        return epi

    async def _log(self, trial: Trial, config: Configuration, bench: dict[str, Any], epi: dict[str, Any]) -> None:
        validity = epi.get("validity") or {}
        valid = bool(validity.get("valid"))
        reasons = list(validity.get("reasons") or [])

        async def provenance() -> dict[str, Any]:
            lab = await self.actions.trial_provenance(config)
            return {
                "software": software(),
                "config_digest": self.cfg.digest(),
                "configuration": dataclasses.asdict(config),
                "lab": lab,
                "session": self._prepared or {},
                "deploy": self._deploy_data,
                "benchmark": bench.get("provenance") or {},
                "lm_eval_version": bench.get("lm_eval_version"),
                "token_denominator": self.cfg.thresholds.token_denominator,
                "simulated": self.cfg.simulated,
            }

        async def commit(prov: dict[str, Any]) -> None:
            async with self.ledger.transaction():
                await self.ledger.put_provenance("trial", trial.id, prov)
                await self.ledger.set_trial(trial.id, status="done", valid=valid, reasons=reasons)
                await self.ledger.checkpoint(trial.id, "log", "done")

        await self._stage(trial, "log", provenance, commit=commit)
        self._trials_done += 1
        energy = epi.get("energy") or {}
        acc = (epi.get("accuracy") or {}).get("composite")
        value = (epi.get("epi") or {}).get("value")
        await self._emit("result", f"{trial.config_id} rep {trial.rep}: {energy.get('joules_per_token')} J/token, "
                         f"accuracy {acc}, EPI {value}{'' if valid else ' (invalid)'}", trial_id=trial.id,
                         config_id=trial.config_id, rep=trial.rep, valid=valid, reasons=reasons,
                         joules=energy.get("total_joules"), tokens=energy.get("total_tokens"),
                         joules_per_token=energy.get("joules_per_token"), accuracy=acc, epi=value)
