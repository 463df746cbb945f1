"""``epiconsole doctor``: check every piece of the lab and say what is wrong and how to fix it.

Checks, in order: ``meter`` (info line and samples for 2 s), ``dgx`` and ``pi0``..``pi3`` (reachable,
host key, authentication, health), ``api`` (the root's dllama-api answers ``/v1/models``). Each check is
independent and bounded by a timeout, so one dead host never hides the others. When a lab service is
running it owns the serial port: the meter check then reads the service's live meter state instead of
opening the port a second time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from epiconsole import labdrivers
from epiconsole.config import LabConfig

METER_LISTEN_S = 2.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def _live_service(cfg: LabConfig) -> Any:
    """The live snapshot of a running lab service for this ledger, or None."""
    path = cfg.ledger_path()
    if not path.exists():
        return None
    from epiconsole.ledger import Ledger
    from epiconsole.live import LiveSnapshot

    try:
        async with await Ledger.open(path, readonly=True) as ledger:
            snap = LiveSnapshot.from_live(await ledger.get_live())
    except Exception:  # an unreadable ledger is not the meter's problem; check the port directly
        return None
    return snap if snap.service.alive() else None


async def check_meter(cfg: LabConfig) -> Check:
    snap = await _live_service(cfg)
    if snap is not None and snap.meter.port == cfg.meter.port:
        m = snap.meter
        fresh = m.connected and time.time() - m.last_sample < max(2.0, cfg.meter.silent_after_s)
        via = f"via the running lab service (pid {snap.service.pid})"
        if fresh:
            return Check("meter", True, f"{m.serial or 'meter'} fw {m.firmware or '?'}: samples flowing at "
                         f"{m.rate_hz:.1f} Hz {via}; lost {m.lost_lines}, bad {m.bad_lines}, reconnects {m.reconnects}")
        return Check("meter", False, f"the lab service (pid {snap.service.pid}) gets no samples from {cfg.meter.port}; "
                     "check the USB cable and the board's power, and [meter] port")

    from drivers.epimeter import MeterError, MeterSample

    meter = labdrivers.meter(cfg)
    samples = 0
    try:
        await meter.start()
        try:
            await meter.wait_connected(3.0)
        except (MeterError, TimeoutError):
            reason = meter.status().last_error or "it does not open"
            return Check("meter", False, f"cannot open {cfg.meter.port} ({reason}); plug the epi-meter in "
                         "or set [meter] port to its /dev/serial/by-id/... path")

        async def count() -> None:
            nonlocal samples
            async for ev in meter.events():
                if isinstance(ev, MeterSample):
                    samples += 1

        counter = asyncio.create_task(count(), name="doctor-meter-samples")
        try:
            try:
                info = await meter.info(timeout=3.0)
            except (MeterError, TimeoutError):
                info = None
            await asyncio.sleep(METER_LISTEN_S)
        finally:
            counter.cancel()
            await asyncio.gather(counter, return_exceptions=True)
        st = meter.status()
        if info is None:
            return Check("meter", False, f"{cfg.meter.port} opened but the board does not answer 'info'; "
                         f"check the baud rate ([meter] baud = {cfg.meter.baud}) and the firmware")
        if samples == 0:
            return Check("meter", False, f"{info.board} {info.serial} answers but sent no samples in "
                         f"{METER_LISTEN_S:g} s; power-cycle the board")
        sim = " (simulated)" if info.simulated else ""
        return Check("meter", True, f"{info.board} {info.serial}{sim} fw {info.fw}, calibrated {info.cal_date}, "
                     f"±{info.uncertainty_pct:g} %: {samples} samples in {METER_LISTEN_S:g} s, "
                     f"bad lines {st.bad_total}, lost {st.lost}")
    finally:
        await meter.close()


async def check_host(cfg: LabConfig, name: str, pool: Any, cluster: Any) -> Check:
    from drivers.ssh import SshError

    host = cfg.hosts[name]
    where = f"{host.user}@{host.address}:{host.port}"
    if name in cfg.cluster.nodes:
        h = await cluster.health(name, timeout=host.connect_timeout_s + 10)
        if not h.ok:
            return Check(name, False, h.error or f"{where} answered but its health could not be read")
        notes = []
        if h.governor != "performance":
            notes.append(f"governor {h.governor} (the run sets performance)")
        if h.throttled_now:
            return Check(name, False, f"{where} is throttled now ({', '.join(h.throttled_now)}); "
                         "check its power supply and cooling")
        if h.temp_c is not None and h.temp_c >= cfg.thresholds.node_temp_max_c:
            return Check(name, False, f"{where} runs at {h.temp_c:.1f} °C (limit "
                         f"{cfg.thresholds.node_temp_max_c:g} °C); check its cooling")
        if h.throttled_since:
            notes.append(f"was throttled since boot ({', '.join(h.throttled_since)})")
        ghz = f"{h.arm_hz / 1e9:.1f} GHz" if h.arm_hz else "clock ?"
        return Check(name, True, f"{where}: {h.temp_c:.1f} °C, {ghz}, load {h.load1:.2f}"
                     + (f"; {'; '.join(notes)}" if notes else ""))
    try:
        r = await pool.run(name, "uname -r && epiconsole --version", timeout=host.connect_timeout_s + 20)
    except SshError as exc:
        return Check(name, False, str(exc))
    if r.exit_status == 127:
        return Check(name, False, f"{where} is reachable but has no epiconsole; install the surgeon toolkit "
                     "there: pip install 'epiconsole[surgeon]'")
    if r.exit_status != 0:
        return Check(name, False, f"{where}: 'uname -r && epiconsole --version' failed "
                     f"({r.stderr_tail(1) or f'status {r.exit_status}'}); run it there by hand and reinstall the "
                     "surgeon toolkit if it fails: pip install 'epiconsole[surgeon]'")
    kernel, _, version = r.stdout.strip().partition("\n")
    return Check(name, True, f"{where}: kernel {kernel.strip()}, {version.strip()}")


async def check_api(cfg: LabConfig) -> Check:
    from drivers.dllama_api import ApiError, ApiUnavailable

    api = labdrivers.api(cfg, timeout_s=10.0)
    try:
        models = await api.models()
    except (ApiUnavailable, ApiError) as exc:
        return Check("api", False, f"{str(exc).rstrip('.')} (dllama-api runs on {cfg.cluster.root} once a "
                     "configuration is deployed by epiconsole run)")
    finally:
        await api.close()
    return Check("api", True, f"{labdrivers.api_url(cfg)} serves {', '.join(models) or 'no model'}")


async def run_checks(cfg: LabConfig, on_check: Callable[[Check], None] | None = None) -> list[Check]:
    """All checks, concurrently; each bounded, none able to stop the others."""
    pool = labdrivers.ssh_pool(cfg)
    cluster = labdrivers.cluster(cfg, pool)
    names = ["meter", "dgx", *cfg.cluster.nodes, "api"]

    async def guarded(name: str, coro: Awaitable[Check]) -> Check:
        try:
            check = await asyncio.wait_for(coro, timeout=60.0)
        except TimeoutError:
            check = Check(name, False, "no answer within 60 s; check that the host is on and reachable")
        if on_check:
            on_check(check)
        return check

    coros = {"meter": check_meter(cfg), "api": check_api(cfg)}
    coros.update({n: check_host(cfg, n, pool, cluster) for n in ["dgx", *cfg.cluster.nodes]})
    try:
        results = await asyncio.gather(*(guarded(n, coros[n]) for n in names))
    finally:
        await pool.close()
    return list(results)
