"""The simulated epi-meter: protocol v1 lines written into a real pseudo-terminal.

The real driver (:mod:`drivers.epimeter`) opens ``dir/ttyEPI0`` exactly as it opens the board's USB
serial device. That path is a symlink to the current pty slave, like a ``/dev/serial/by-id`` link: an
unplug closes the pty and removes the link (the reader sees the port vanish), a replug makes a new pty
and points the link at it.

Device time is the lab's virtual time (:class:`~epiconsole.sim.clock.SimClock`): ``ms`` is virtual
uptime, energy is integrated over virtual seconds, and the board ticks ``rate_hz`` times per *virtual*
second, so ``rate_hz * scale`` lines per real second, written in batches every ~15 ms rather than one
timer per line. The board is modelled as powered from the AC side: it keeps ticking while unplugged
(those ticks are never written, so the driver sees a seq jump on replug).

Faults: the live switches in ``lab.faults`` (``garbage_fraction``, ``lost_line_fraction``,
``meter_unplugged``, ``meter_reboot_requested``) are polled every batch; the config's scheduled ones
(``meter_unplug_at_s`` for ``meter_unplug_for_s``, ``meter_reboot_at_s``, lab seconds since the lab
started) flip those switches once when their time comes.

Like a TinyUSB board, it sends nothing while no host holds the port open (DTR low): lines of those
ticks are dropped at the source, so a host that opens the port never reads a stale backlog. The host
asks for the info line when it connects.

The info line carries ``"simulated": true`` and a ``-sim`` firmware version so nothing downstream can
mistake these readings for measurements. ``emitted`` keeps what was written, for tests to compare.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import select
import tempfile
import tty
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from epiconsole.sim.state import SimLab

U32_MASK = 0xFFFFFFFF
#: Status bit: a CT reads as open (used for channels wired to no node).
ST_CT_OPEN = 0x2
#: Real seconds between write batches.
BATCH_S = 0.015
#: Bytes the simulated board buffers while nobody reads the port; beyond it lines are dropped.
OUT_CAP = 64 * 1024
_GARBAGE_BYTES = bytes(b for b in range(256) if b not in b"\n{}")


@dataclass
class MeterEmitted:
    """What the simulated board produced (totals since :meth:`SimMeter.start`)."""

    #: Ticks generated (each advances seq), written or not.
    ticks: int = 0
    #: Sample lines queued to the port.
    sample_lines: int = 0
    info_lines: int = 0
    answers: int = 0
    garbage_lines: int = 0
    #: Ticks skipped on purpose by the ``lost_line_fraction`` fault (seq numbers never sent).
    lost_on_purpose: int = 0
    #: Ticks generated while unplugged (never sent).
    unplugged_ticks: int = 0
    #: Ticks generated while plugged in but no host had the port open (never sent).
    no_host_ticks: int = 0
    #: Lines dropped because nobody read the port and the board's buffer was full.
    dropped_unread: int = 0
    reboots: int = 0
    unplugs: int = 0
    #: Energy counter per channel at the last tick (Wh since boot).
    wh: list[float] = field(default_factory=list)
    #: Recent queued sample lines as (seq, ms, Wh per channel), for exact comparisons.
    recent: deque[tuple[int, int, tuple[float, ...]]] = field(default_factory=lambda: deque(maxlen=8192))


class SimMeter:
    """A simulated epi-meter board on a pseudo-terminal, reading :class:`SimLab`."""

    def __init__(
        self,
        lab: SimLab,
        rate_hz: float = 10.0,
        dir: str | os.PathLike[str] | None = None,
        *,
        name: str = "ttyEPI0",
        channels: int = 4,
        serial: str = "EM-SIM-0001",
    ) -> None:
        if not 1 <= rate_hz <= 50:
            raise ValueError("the epi-meter's rate is 1-50 Hz")
        self.lab = lab
        self.rate_hz = float(rate_hz)
        self.dir = Path(dir) if dir is not None else None
        self.name = name
        self.channels = channels
        self.serial = serial
        self.emitted = MeterEmitted(wh=[0.0] * channels)
        self._rng = random.Random(lab.cfg.sim.seed * 1_000_003 + 7)
        self._master: int | None = None
        self._slave_name = ""
        self._out = bytearray()
        self._writing = False
        self._reading = False
        #: Batches in a row that found a host holding the port open.
        self._host_batches = 0
        self._unplug_scheduled = self._reboot_scheduled = False
        self._replug_at: float | None = None
        self._inbuf = bytearray()
        self._task: asyncio.Task[None] | None = None
        self._unplugged = False
        self._tick_index = 0  # global across reboots: the physics noise is keyed by it
        self._boot(send_info=False)

    # -- public ----------------------------------------------------------------------------------

    @property
    def port(self) -> str:
        """The stable port path (a symlink that survives unplug/replug)."""
        if self.dir is None:
            raise RuntimeError("SimMeter.start() has not run")
        return str(self.dir / self.name)

    async def start(self) -> str:
        """Open the pty, boot the board and start ticking; returns the stable port path."""
        if self._task is not None:
            return self.port
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="epimeter-sim-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self._unplugged = self.lab.faults.meter_unplugged
        if not self._unplugged:
            self._open_pty()
        self._boot()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sim epi-meter")
        return self.port

    async def stop(self) -> None:
        """Stop ticking, write what is queued if the port takes it, close the pty and remove the link."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._flush()
        self._close_pty()

    def unplug(self) -> None:
        """Pull the USB cable: the pty closes and the port path disappears."""
        self.lab.faults.meter_unplugged = True
        self._apply_plug()

    def replug(self) -> None:
        """Plug it back in: a new pty behind the same port path."""
        self.lab.faults.meter_unplugged = False
        self._apply_plug()

    def reboot(self) -> None:
        """Reset the board: uptime, seq and energy counters restart at 0; the info line is sent again."""
        self.emitted.reboots += 1
        self._boot()

    @property
    def unplugged(self) -> bool:
        return self._unplugged

    # -- board -----------------------------------------------------------------------------------

    def _boot(self, send_info: bool = True) -> None:
        self._boot_v = self.lab.clock.now()
        self._seq = 0
        self._next_up = 0.0
        self._prev_up = 0.0
        self._wh = [0.0] * self.channels
        self.emitted.wh = list(self._wh)
        if send_info:
            self._queue_line(self._info_line(), count="info_lines")

    def _info_line(self) -> bytes:
        info = {
            "board": "epi-meter",
            "fw": "1.0.0-sim",
            "serial": self.serial,
            "channels": self.channels,
            "rate_hz": self.rate_hz,
            "cal_date": "2026-05-01",
            "ct": "SCT-013-005",
            "uncertainty_pct": 1.0,
            "simulated": True,
        }
        return _dumps({"v": 1, "info": info})

    def _produce(self) -> None:
        uptime = self.lab.clock.now() - self._boot_v
        while self._next_up <= uptime:
            self._tick(self._next_up)
            self._next_up += 1.0 / self.rate_hz

    def _tick(self, up: float) -> None:
        dt = up - self._prev_up
        self._prev_up = up
        st = 0
        chans = []
        v_mains, hz_mains = 0.0, 0.0
        readings = [self.lab.electrical(ch, self._tick_index) for ch in range(self.channels)]
        for e in readings:
            if e is not None:
                v_mains, hz_mains = e.V, e.Hz
                break
        for ch, e in enumerate(readings):
            if e is None:
                st |= ST_CT_OPEN
                chans.append({"id": ch, "V": round(v_mains, 2), "A": 0.0, "W": 0.0, "VAR": 0.0, "PF": 0.0,
                              "Hz": round(hz_mains, 3), "Wh": self._wh[ch]})
                continue
            # The energy register integrates true power (V*A*PF), not the coarse 1 W mean-power register.
            self._wh[ch] += e.V * e.A * e.PF * dt / 3600.0
            chans.append({"id": ch, "V": round(e.V, 2), "A": round(e.A, 5), "W": round(e.W, 3),
                          "VAR": round(e.VAR, 3), "PF": round(e.PF, 3), "Hz": round(e.Hz, 3),
                          "Wh": self._wh[ch]})
        self._tick_index += 1
        seq = self._seq
        self._seq = (seq + 1) & U32_MASK
        em = self.emitted
        em.ticks += 1
        em.wh = list(self._wh)
        if self._unplugged:
            em.unplugged_ticks += 1
            return
        if not self._host_ready():
            em.no_host_ticks += 1
            return
        faults = self.lab.faults
        if faults.lost_line_fraction > 0 and self._rng.random() < faults.lost_line_fraction:
            em.lost_on_purpose += 1
            return
        if faults.garbage_fraction > 0 and self._rng.random() < faults.garbage_fraction:
            self._queue_line(self._garbage(), count="garbage_lines")
        ms = int(round(up * 1000.0)) & U32_MASK
        line = _dumps({"v": 1, "seq": seq, "ms": ms, "st": st, "ch": chans})
        if self._queue_line(line, count="sample_lines"):
            em.recent.append((seq, ms, tuple(self._wh)))

    def _garbage(self) -> bytes:
        # Never a newline or a brace, so it is one whole line the host must classify as garbage.
        n = self._rng.randint(1, 80)
        return bytes(self._rng.choice(_GARBAGE_BYTES) for _ in range(n)) + b"\n"

    def _queue_line(self, line: bytes, count: str, answer: bool = False) -> bool:
        # An answer goes out as soon as the host is there: it asked, so its port is open and set up.
        if self._unplugged or not (self._host_ready() or (answer and self._host_batches > 0)):
            return False
        # The board buffers OUT_CAP bytes of *device* time; the simulated device clock runs time_scale
        # faster, so the same device-time buffer is time_scale times larger in real bytes.
        if len(self._out) + len(line) > OUT_CAP * max(1.0, self.lab.clock.scale):
            self.emitted.dropped_unread += 1
            return False
        self._out += line
        setattr(self.emitted, count, getattr(self.emitted, count) + 1)
        return True

    # -- commands from the host ------------------------------------------------------------------

    def _on_readable(self) -> None:
        if self._master is None:
            return
        try:
            data = os.read(self._master, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._host_gone()  # EIO: the host closed the port; stop the selector from spinning on HUP
            return
        self._inbuf += data
        while True:
            nl = self._inbuf.find(b"\n")
            if nl < 0:
                break
            line = bytes(self._inbuf[:nl]).strip()
            del self._inbuf[: nl + 1]
            if line:
                self._queue_line(*self._answer(line), answer=True)
        if len(self._inbuf) > 4096:
            self._inbuf.clear()  # a real board's command buffer is small too
        self._flush()

    def _answer(self, line: bytes) -> tuple[bytes, str]:
        """The board's reply to one command line and the ``emitted`` counter it goes to."""
        try:
            cmd = json.loads(line)
        except ValueError:
            return _dumps({"v": 1, "ok": False, "cmd": "", "error": "invalid JSON"}), "answers"
        if not isinstance(cmd, dict) or not isinstance(cmd.get("cmd"), str):
            return _dumps({"v": 1, "ok": False, "cmd": "", "error": "expected {\"cmd\": ...}"}), "answers"
        name = cmd["cmd"]
        if name == "info":
            return self._info_line(), "info_lines"
        if name == "rate":
            hz = cmd.get("hz")
            if isinstance(hz, bool) or not isinstance(hz, int | float) or not 1 <= hz <= 50:
                err = {"v": 1, "ok": False, "cmd": "rate", "error": "hz must be a number from 1 to 50"}
                return _dumps(err), "answers"
            self.rate_hz = float(hz)
            self._next_up = self._prev_up + 1.0 / self.rate_hz
            return _dumps({"v": 1, "ok": True, "cmd": "rate"}), "answers"
        return _dumps({"v": 1, "ok": False, "cmd": name, "error": f"unknown command {name!r}"}), "answers"

    # -- pty -------------------------------------------------------------------------------------

    def _open_pty(self) -> None:
        master, slave = os.openpty()
        # Raw mode: the line discipline must neither echo commands back nor translate newlines.
        tty.setraw(slave)
        os.set_blocking(master, False)
        self._slave_name = os.ttyname(slave)
        # Only the host holds the slave side, so the master reports HUP while no host has it open.
        os.close(slave)
        self._master = master
        self._host_batches = 0
        assert self.dir is not None
        link = self.dir / self.name
        tmp = self.dir / f".{self.name}.new"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(self._slave_name, tmp)
        os.replace(tmp, link)  # atomic: the path never points at a dead pty
        self._inbuf.clear()

    def _close_pty(self) -> None:
        if self.dir is not None:
            link = self.dir / self.name
            with contextlib.suppress(FileNotFoundError):
                if os.readlink(link) == self._slave_name:
                    link.unlink()
        if self._master is not None:
            self._host_gone()
            with contextlib.suppress(OSError):
                os.close(self._master)
        self._master = None
        self._out.clear()  # bytes in flight die with the cable

    def _poll_host(self) -> None:
        """Once per batch: is a host holding the port open (no HUP on the master)?"""
        master = self._master
        if master is None:
            return
        p = select.poll()
        p.register(master, select.POLLIN)
        present = not any(ev & select.POLLHUP for _, ev in p.poll(0))
        if not present:
            if self._host_batches:
                self._host_gone()
            return
        self._host_batches += 1
        if not self._reading:
            asyncio.get_running_loop().add_reader(master, self._on_readable)
            self._reading = True

    def _host_ready(self) -> bool:
        # One whole batch after the host opened the port, like a board waiting for DTR: pyserial
        # flushes the input queue while it opens, which would eat lines written in that instant.
        return self._master is not None and self._host_batches >= 2

    def _host_gone(self) -> None:
        self._host_batches = 0
        master = self._master
        if master is not None and (self._reading or self._writing):
            loop = asyncio.get_running_loop()
            loop.remove_reader(master)
            loop.remove_writer(master)
        self._reading = self._writing = False
        self._out.clear()
        self._inbuf.clear()

    def _scheduled_faults(self) -> None:
        """``[sim.faults] meter_unplug_at_s / meter_unplug_for_s / meter_reboot_at_s``, in lab seconds."""
        sched = self.lab.cfg.sim.faults
        now = self.lab.clock.now()
        if 0 <= sched.meter_unplug_at_s <= now and not self._unplug_scheduled:
            self._unplug_scheduled = True
            self._replug_at = sched.meter_unplug_at_s + sched.meter_unplug_for_s
            self.lab.faults.meter_unplugged = True
        if self._replug_at is not None and now >= self._replug_at:
            self._replug_at = None
            self.lab.faults.meter_unplugged = False
        if 0 <= sched.meter_reboot_at_s <= now and not self._reboot_scheduled:
            self._reboot_scheduled = True
            self.lab.faults.meter_reboot_requested = True

    def _apply_plug(self) -> None:
        want = self.lab.faults.meter_unplugged
        if want == self._unplugged:
            return
        if want:
            self._unplugged = True
            self.emitted.unplugs += 1
            self._close_pty()
        else:
            self._unplugged = False
            if self._task is not None:
                self._open_pty()

    def _flush(self) -> None:
        """Write what the port takes now; the rest waits for the pty to drain (a writer callback)."""
        master = self._master
        if master is None or not self._host_batches:
            return
        while self._out:
            try:
                n = os.write(master, self._out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._out.clear()  # the pty went away under us
                break
            del self._out[:n]
        # Without this the pty's small buffer would cap throughput at one buffer per batch.
        loop = asyncio.get_running_loop()
        if self._out and not self._writing:
            loop.add_writer(master, self._flush)
            self._writing = True
        elif not self._out and self._writing:
            loop.remove_writer(master)
            self._writing = False

    async def _run(self) -> None:
        try:
            while True:
                self._scheduled_faults()
                self._apply_plug()
                self._poll_host()
                if self.lab.faults.meter_reboot_requested:
                    self.lab.faults.meter_reboot_requested = False
                    self.reboot()
                self._produce()
                self._flush()
                await asyncio.sleep(BATCH_S)
        finally:
            self._flush()


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


__all__ = ["BATCH_S", "MeterEmitted", "SimMeter"]
