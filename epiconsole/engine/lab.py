"""The stages against a real (or simulated) lab: the DGX over SSH, the Pis over SSH, lm-eval over HTTP
and energy from the ledger. Implements :class:`epiconsole.engine.actions.StageActions`.

Driver errors (unreachable host, failed command, API refusing) become :class:`StageError` with the
driver's one-sentence message; anything else is a bug and surfaces with its traceback in the ledger.
"""

from __future__ import annotations

import asyncio
import logging
import posixpath
import time
from typing import Any

import numpy as np

from epiconsole.clock import Clock
from epiconsole.engine.actions import Progress, StageError, Window
from epiconsole.engine.monitor import Monitor
from epiconsole.ledger import Ledger
from epiconsole.matrix import Configuration

log = logging.getLogger(__name__)


def _driver_errors() -> tuple[type[BaseException], ...]:
    from drivers.cluster import ApiNotReady, CopyMismatch, SensorError
    from drivers.ssh import SshError

    return (SshError, ApiNotReady, CopyMismatch, SensorError)


class LabActions:
    def __init__(
        self,
        cfg: Any,
        ledger: Ledger,
        cluster: Any,
        surgeon: Any,
        telemetry: Any,
        monitor: Monitor,
        clock: Clock,
    ) -> None:
        self.cfg = cfg
        self.ledger = ledger
        self.cluster = cluster
        self.surgeon = surgeon
        self.telemetry = telemetry
        self.monitor = monitor
        self.clock = clock
        self.api_model = ""
        #: Tokens counted so far in the benchmark running now (for the live J/token).
        self.live_tokens = 0

    # ------------------------------------------------------------------------------- helpers

    def conditions(self) -> dict[str, str]:
        return self.monitor.conditions()

    def out_dir(self, config: Configuration) -> str:
        """Where the DGX keeps a configuration's model (an unmodified model is converted in place)."""
        if not config.modified:
            return config.source or self.cfg.surgery.source
        return posixpath.join(self.cfg.surgery.work_dir, config.id)

    def model_files(self, config: Configuration) -> tuple[str, str]:
        out = self.out_dir(config)
        return (posixpath.join(out, f"dllama_model_{config.id}_q40.m"),
                posixpath.join(out, f"dllama_tokenizer_{config.id}.t"))

    async def _job(self, stage: str, job: Any, progress: Progress) -> dict[str, Any]:
        """Stream a surgeon job's events into ``progress``; its final event's data is the stage's result."""
        last: dict[str, Any] = {}
        checks: list[dict[str, Any]] = []
        try:
            async with job:
                async for ev in job:
                    d = dict(ev.data)
                    if ev.kind in ("tensor", "shard") and d.get("total"):
                        progress(float(d.get("done", d.get("index", 0))) / float(d["total"]), ev.kind)
                    elif ev.kind == "check":
                        checks.append({k: d.get(k) for k in ("name", "ok", "detail", "skipped")})
                    elif ev.kind != "log":
                        last = d
                result = await job.result()
        except _driver_errors() as exc:
            raise StageError(f"{stage}: {exc}") from None
        if not result.ok:
            tail = result.error or "; ".join(result.stderr_tail[-2:]) or f"exit status {result.exit_status}"
            raise StageError(f"{stage} on {self.surgeon.host} failed: {tail}")
        out = {k: v for k, v in last.items() if k != "event"}
        if checks:
            out["checks"] = checks
        return out

    # ---------------------------------------------------------------------------------- stages

    async def prepare(self) -> dict[str, Any]:
        """Before the first stage: load lm-eval (outside any window), and the meter's info for provenance."""
        # lm-eval's first import and task index take seconds of CPU in its worker thread; paid here,
        # they cannot starve the meter's reader during a measurement window.
        from epiconsole.benchmark.suite import warm_up

        await asyncio.to_thread(warm_up, self.cfg.benchmark, simulated=self.cfg.simulated)
        info = self.telemetry.info
        if info is None:
            try:
                info = await self.telemetry.meter.info(timeout=2.0)
            except Exception:  # the meter may be unplugged right now; the suspender handles that
                info = None
        meter = {}
        if info is not None:
            meter = {"board": info.board, "firmware": info.fw, "serial": info.serial, "cal_date": info.cal_date,
                     "uncertainty_pct": info.uncertainty_pct, "ct": info.ct, "rate_hz": info.rate_hz,
                     "simulated": getattr(info, "simulated", False)}
        return {"meter": meter}

    async def surgery(self, config: Configuration, progress: Progress) -> dict[str, Any]:
        s = self.cfg.surgery
        job = self.surgeon.surgery(source=config.source or s.source, experts=config.experts,
                                   layers=config.target or "all", strategy=config.strategy or s.strategy,
                                   profile=s.profile, out=self.out_dir(config))
        return await self._job("surgery", job, progress)

    async def validate(self, config: Configuration, progress: Progress) -> dict[str, Any]:
        data = await self._job("validate", self.surgeon.validate(out=self.out_dir(config)), progress)
        failed = [c for c in data.get("checks", []) if c.get("ok") is False]
        if failed or data.get("ok") is False:
            names = ", ".join(str(c.get("name")) for c in failed) or "see the log"
            raise StageError(f"validation of {config.id} failed: {names}")
        return data

    async def convert(self, config: Configuration, progress: Progress) -> dict[str, Any]:
        s = self.cfg.surgery
        job = self.surgeon.convert(out=self.out_dir(config), converter=s.converter,
                                   tokenizer_converter=s.tokenizer_converter, name=config.id)
        await self._job("convert", job, progress)
        model, tokenizer = self.model_files(config)
        try:
            size, digest = await self.cluster.file_info(self.surgeon.host, model)
        except _driver_errors() as exc:
            raise StageError(f"convert: {exc}") from None
        if size is None or digest is None:
            raise StageError(f"convert wrote no {posixpath.basename(model)} on {self.surgeon.host}")
        return {"model": model, "tokenizer": tokenizer, "size": size, "sha256": digest}

    async def deploy(self, config: Configuration, progress: Progress) -> dict[str, Any]:
        cl = self.cluster
        model, tokenizer = self.model_files(config)
        dest = self.cfg.cluster.model_dir
        try:
            progress(0.0, "stopping distributed-llama")
            await cl.stop_root()
            await cl.stop_workers()
            progress(0.1, "copying the model to the root node")
            checks = await cl.copy_and_verify(self.surgeon.host, [model, tokenizer], cl.root, dest)
            progress(0.6, "starting workers and root")
            await cl.start_workers()
            await cl.start_root(posixpath.join(dest, posixpath.basename(model)),
                                posixpath.join(dest, posixpath.basename(tokenizer)))
            progress(0.7, "waiting for the API")
            ready_s = await cl.wait_api_ready(timeout=self.cfg.cluster.api_ready_timeout_s,
                                              interval=max(self.clock.real(0.5), 0.02))
        except _driver_errors() as exc:
            raise StageError(f"deploy: {exc}") from None
        models = await self._api_models()
        self.api_model = models[0] if models else ""
        return {
            "files": [{"path": c.path, "size": c.size, "sha256": c.sha256} for c in checks],
            "model_sha256": checks[0].sha256,
            "model_size": checks[0].size,
            "api_model": self.api_model,
            "ready_s": ready_s,
        }

    async def _api_models(self) -> list[str]:
        from drivers.dllama_api import ApiError, ApiUnavailable, DllamaApi

        api = DllamaApi(self.cluster.api_url, timeout_s=5.0)
        try:
            return await api.models()
        except (ApiUnavailable, ApiError):
            return []
        finally:
            await api.close()

    async def deployed(self, config: Configuration, deploy: dict[str, Any] | None) -> bool:
        stem = f"dllama_model_{config.id}_q40"
        models = await self._api_models()
        ok = any(m == stem or m.startswith(stem) or posixpath.basename(m).startswith(stem) for m in models)
        if ok:
            self.api_model = models[0]
        return ok

    async def _set_performance(self) -> dict[str, str]:
        governors = {n: (h.governor or "") for n, h in self.monitor.health.items()}
        for node in self.cfg.cluster.nodes:
            if governors.get(node) != "performance":
                try:
                    await self.cluster.set_governor(node, "performance")
                except _driver_errors() as exc:
                    raise StageError(f"stabilize: cannot set the governor on {node}: {exc}") from None
        await self.monitor.poll_now()
        governors = {n: (h.governor or "") for n, h in self.monitor.health.items()}
        wrong = {n: g for n, g in governors.items() if g != "performance"}
        if wrong:
            raise StageError(f"stabilize: governor is not performance on {', '.join(sorted(wrong))}")
        return governors

    async def stabilize(self, config: Configuration, progress: Progress) -> dict[str, Any]:
        """At least ``stabilize_min_s`` AND each node's spread over the last window under the threshold."""
        th = self.cfg.thresholds
        governors = await self._set_performance()
        start = time.monotonic()
        min_real = self.clock.real(th.stabilize_min_s)
        window_real = self.clock.real(th.stabilize_window_s)
        limit_real = self.clock.real(max(th.stabilize_min_s * 10, th.stabilize_min_s + 600))
        channels = {int(k): v for k, v in self.cfg.meter.channels.items() if v in self.cfg.cluster.nodes}
        spreads: dict[str, float | None] = {}
        while True:
            elapsed = time.monotonic() - start
            progress(min(elapsed / min_real, 1.0) if min_real > 0 else 1.0, "stabilizing")
            if elapsed >= min_real and elapsed >= window_real:
                # The ledger is up to a flush behind the meter: judge the newest committed window.
                end = self.telemetry.committed_t
                block = await self.ledger.read_samples(end - window_real, end)
                spreads = {}
                for ch, node in channels.items():
                    w = block.W[:, ch] if block.n else np.empty(0)
                    w = w[~np.isnan(w)]
                    spreads[node] = float(w.max() - w.min()) if w.size >= 2 else None
                if all(s is not None and s <= th.stabilize_spread_w for s in spreads.values()):
                    break
            if elapsed > limit_real:
                worst = max(((n, s) for n, s in spreads.items() if s is not None), key=lambda x: x[1], default=None)
                detail = f"{worst[0]} varies by {worst[1]:.2f} W" if worst else "no samples"
                raise StageError(f"stabilize: power did not settle within {th.stabilize_min_s * 10:g} s ({detail}; "
                                 f"limit {th.stabilize_spread_w:g} W)")
            await asyncio.sleep(max(min(window_real, min_real) / 10, 0.02))
        temps = {n: h.temp_c for n, h in self.monitor.health.items()}
        return {"seconds": self.clock.lab(time.monotonic() - start), "spread_w": spreads, "temps_c": temps,
                "governors": governors, "ambient_c": self.monitor.ambient}

    def window_begin(self, t0: float) -> None:
        self.telemetry.window_begin(t0)

    async def benchmark(self, config: Configuration, progress: Progress) -> dict[str, Any]:
        from epiconsole.benchmark.suite import BenchmarkError, run_suite

        denominator = self.cfg.thresholds.token_denominator
        self.live_tokens = 0

        def on_progress(p: Any) -> None:
            self.live_tokens = {"prompt": p.prompt_tokens, "completion": p.completion_tokens}.get(
                denominator, p.prompt_tokens + p.completion_tokens)
            progress(p.done / p.total if p.total else None, f"{p.done}/{p.total} requests")

        try:
            result = await run_suite(self.cluster.api_url, self.cfg.benchmark, simulated=self.cfg.simulated,
                                     on_progress=on_progress, timeout_s=self.cfg.cluster.api_timeout_s)
        except BenchmarkError as exc:
            raise StageError(f"benchmark: {exc}") from None
        out = result.to_dict()
        out["finished"] = True
        return out

    async def window_end(self, t1: float) -> None:
        """Close the window: one health reading after it, and samples past it committed."""
        self.telemetry.window_end()
        margin = self.clock.real(self.cfg.thresholds.gap_limit_s)
        poll = asyncio.ensure_future(self.monitor.poll_now())
        try:
            ok = await self.telemetry.wait_committed(t1 + margin, timeout=max(5.0, margin * 4))
        finally:
            await poll
        if not ok:
            raise StageError("the meter's samples after the window did not arrive; check the meter")

    async def calculate(self, window: Window, bench: dict[str, Any]) -> dict[str, Any]:
        from epiconsole.engine.calculate import compute

        margin = self.clock.real(self.cfg.thresholds.gap_limit_s) * 2 + 0.5
        block = await self.ledger.read_samples(window.t0 - margin, window.t1 + margin)
        health = self.monitor.window_health(window.t0, window.t1)
        meta = {"config_id": window.config_id, "repetition": window.rep, "trial_id": window.trial_id,
                "api_model": self.api_model, "lab": self.cfg.lab.name}
        return compute(block, window.t0, window.t1, bench, health, cfg=self.cfg, scale=self.clock.scale, meta=meta)

    async def trial_provenance(self, config: Configuration) -> dict[str, Any]:
        nodes: dict[str, Any] = {}
        for node in self.cfg.cluster.nodes:
            try:
                p = await self.cluster.provenance(node)
                nodes[node] = {"kernel": p.kernel, "dllama": p.dllama}
            except _driver_errors() as exc:
                nodes[node] = {"error": str(exc)}
        info = self.telemetry.info
        meter = {}
        if info is not None:
            meter = {"firmware": info.fw, "serial": info.serial, "cal_date": info.cal_date,
                     "uncertainty_pct": info.uncertainty_pct, "simulated": getattr(info, "simulated", False)}
        return {"nodes": nodes, "meter": meter, "api_model": self.api_model}
