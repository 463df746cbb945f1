"""The epi-meter over USB serial: protocol v1 (METER-PROTOCOL.md), framing, gaps and the device clock.

Layers, each usable on its own:

* :func:`parse_line` - one line (bytes, no newline) to a :class:`SampleLine`, :class:`MeterInfo`,
  :class:`CommandAnswer` or :class:`BadLine`. Pure and fast; the benchmark times it.
* :class:`LineFramer` - bytes to lines with the 4 KiB cap (an overlong line is counted once and
  skipped up to its newline).
* :class:`ClockFit` - device time to host time: a windowed least-squares slope (receive-time jitter
  averages out) with the offset on the lower envelope (receive times are only ever late).
* :class:`EpiMeter` - the port itself: reconnects with backoff, detects lost lines (``seq``), reboots
  (``ms``/``Wh`` backwards) and unplugs, and yields typed events from :meth:`EpiMeter.events`.

Nothing on the wire stops the stream: every bad line is counted by kind and skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import operator
import os
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
#: Longest accepted line in bytes, newline excluded (METER-PROTOCOL.md: cap 4 KiB).
MAX_LINE = 4096
U32 = 1 << 32
_HALF = 1 << 31
MIN_RATE_HZ = 1.0
MAX_RATE_HZ = 50.0

#: Kinds of bad line, in the order status reports them.
BAD_KINDS: tuple[str, ...] = (
    "garbage",  # neither end looks like a JSON object
    "partial",  # one end of an object only: a line cut at its head or tail (or by a disconnect)
    "utf8",  # not valid UTF-8
    "json",  # looks like an object but is not valid JSON (or not an object)
    "overlong",  # longer than MAX_LINE
    "missing_keys",  # valid JSON, but a required key is missing or has the wrong type
    "nan",  # NaN / Infinity where a number belongs
    "unsupported_version",  # a protocol major version other than 1
)

#: Per-channel quantities in line order (the ledger's CHANNEL_FIELDS).
CHANNEL_FIELDS: tuple[str, ...] = ("V", "A", "W", "VAR", "PF", "Hz", "Wh")


# --------------------------------------------------------------------------------------------------
# Values


class ChannelReading(NamedTuple):
    """One channel of one sample; a field the board did not send is NaN.

    An immutable named tuple rather than a frozen dataclass: four are built per line, and a frozen
    dataclass costs four times as much to construct (it dominated the parser's profile). ``r[1:]``
    is the 7 quantities in :data:`CHANNEL_FIELDS` order, as the ledger's sample blocks take them.
    """

    id: int
    V: float
    A: float
    W: float
    VAR: float
    PF: float
    Hz: float
    Wh: float


class SampleLine(NamedTuple):
    """A parsed sample line, before the driver stamps it with host time (a named tuple: built per line)."""

    seq: int
    ms: int
    st: int
    channels: tuple[ChannelReading, ...]


@dataclass(frozen=True, slots=True)
class MeterSample:
    """One tick of the meter: ``host_time`` is when it arrived, ``t`` the device time mapped to host time."""

    seq: int
    ms: int
    st: int
    channels: tuple[ChannelReading, ...]
    host_time: float
    t: float


@dataclass(frozen=True)
class MeterInfo:
    """The board's info line. ``simulated`` is true for the simulated lab's meter."""

    board: str
    fw: str
    serial: str
    channels: int
    rate_hz: float
    cal_date: str
    ct: str
    uncertainty_pct: float
    raw: dict[str, Any] = field(compare=False)
    simulated: bool = False


@dataclass(frozen=True, slots=True)
class CommandAnswer:
    """The board's answer to a command."""

    cmd: str
    ok: bool
    error: str = ""


@dataclass(frozen=True, slots=True)
class BadLine:
    """A line that was counted and skipped; ``kind`` is one of :data:`BAD_KINDS`."""

    kind: str


@dataclass(frozen=True, slots=True)
class MeterGap:
    """Host-time span ``t0``..``t1`` not covered by samples; ``cause`` is seq_jump, reboot, unplug or
    overflow (samples dropped because the consumer of :meth:`EpiMeter.events` fell behind)."""

    t0: float
    t1: float
    cause: str
    lost: int


@dataclass(frozen=True, slots=True)
class MeterState:
    """The port connected or disconnected (``reason`` says why, for the screen and the ledger)."""

    connected: bool
    port: str
    host_time: float
    reason: str = ""


@dataclass(frozen=True)
class MeterStatus:
    """A snapshot of the driver's counters."""

    port: str
    connected: bool
    #: Valid lines of any type (samples, info, answers).
    good: int
    samples: int
    bad: dict[str, int]
    #: Lines the board sent that never arrived (from seq).
    lost: int
    reboots: int
    reconnects: int
    gaps: int
    #: Receive time (host clock) of the last sample; NaN before the first.
    last_sample_host_time: float
    #: Host seconds per device second; the simulated lab's device clock runs ``scale`` times fast.
    clock_slope: float
    #: Host time (epoch seconds) of device uptime 0 in the current boot.
    clock_offset: float
    #: RMS of receive times about the fitted line, seconds: the fit's quality figure.
    clock_residual: float
    clock_points: int
    #: Events dropped because the consumer fell behind the bounded queue.
    dropped_events: int
    last_error: str
    info: MeterInfo | None

    @property
    def bad_total(self) -> int:
        return sum(self.bad.values())


MeterEvent = MeterSample | MeterInfo | MeterGap | MeterState
ParsedLine = SampleLine | MeterInfo | CommandAnswer | BadLine


class MeterError(Exception):
    """A problem talking to the meter; the message is one sentence saying what to do."""


class MeterNotConnected(MeterError):
    pass


class MeterCommandError(MeterError):
    """The board answered a command with ``ok: false``."""


class MeterTimeout(MeterError, TimeoutError):
    pass


# --------------------------------------------------------------------------------------------------
# Parsing

_BAD = {kind: BadLine(kind) for kind in BAD_KINDS}
_NAN = math.nan


class _NonFinite(ValueError):
    pass


def _reject_constant(name: str) -> float:
    # json accepts NaN/Infinity literals by default; the protocol does not.
    raise _NonFinite(name)


_decode = json.JSONDecoder(parse_constant=_reject_constant).decode
_isinf = math.isinf
_ONLY_FLOAT = {float}
_get_fields = operator.itemgetter(*CHANNEL_FIELDS)


def _u32(obj: dict[str, Any], key: str) -> int | None:
    v = obj.get(key)
    if type(v) is not int or not 0 <= v < U32:
        return None
    return v


def _number(v: Any) -> float | None:
    """A channel field as float: None (the line is bad) for a wrong type, NaN for a missing value."""
    if v is None:
        return _NAN
    t = type(v)
    if t is float:
        return v
    if t is int:
        return float(v)
    return None


def parse_line(line: bytes) -> ParsedLine:
    """Parse one protocol line (without its newline). Never raises; bad input gives a :class:`BadLine`."""
    if len(line) > MAX_LINE:
        return _BAD["overlong"]
    s = line.strip()
    head, tail = s[:1] == b"{", s[-1:] == b"}"
    if not (head or tail):
        return _BAD["garbage"]
    try:
        text = s.decode("utf-8")
    except UnicodeDecodeError:
        return _BAD["utf8"]
    if head != tail:
        return _BAD["partial"]
    try:
        obj = _decode(text)
    except _NonFinite:
        return _BAD["nan"]
    except ValueError:
        return _BAD["json"]
    if type(obj) is not dict:
        return _BAD["json"]
    v = obj.get("v")
    if type(v) is not int:
        return _BAD["missing_keys"]
    if v != PROTOCOL_VERSION:
        return _BAD["unsupported_version"]
    ch = obj.get("ch")
    if ch is not None:
        return _parse_sample(obj, ch)
    info = obj.get("info")
    if info is not None:
        return _parse_info(info)
    ok = obj.get("ok")
    if ok is not None:
        cmd = obj.get("cmd")
        if type(ok) is not bool or (cmd is not None and type(cmd) is not str):
            return _BAD["missing_keys"]
        err = obj.get("error")
        return CommandAnswer(cmd or "", ok, err if isinstance(err, str) else "")
    return _BAD["missing_keys"]


def _parse_sample(obj: dict[str, Any], ch: Any) -> ParsedLine:
    seq, ms, st = _u32(obj, "seq"), _u32(obj, "ms"), _u32(obj, "st")
    if seq is None or ms is None or st is None or type(ch) is not list:
        return _BAD["missing_keys"]
    out = []
    for c in ch:
        if type(c) is not dict:
            return _BAD["missing_keys"]
        cid = c.get("id")
        if type(cid) is not int:
            return _BAD["missing_keys"]
        try:
            vals = _get_fields(c)
        except KeyError:
            vals = tuple(map(c.get, CHANNEL_FIELDS))  # a field not sent: NaN below
        if set(map(type, vals)) != _ONLY_FLOAT:
            # Slow path: ints, missing (null or absent) values, wrong types.
            conv = tuple(map(_number, vals))
            if None in conv:
                return _BAD["missing_keys"]
            vals = conv  # type: ignore[assignment]
        total = sum(vals)  # type: ignore[arg-type]
        # NaN here only means "not sent"; inf comes from an out-of-range literal such as 1e999.
        if total - total != 0.0 and any(map(_isinf, vals)):  # type: ignore[arg-type]
            return _BAD["nan"]
        out.append(ChannelReading(cid, *vals))  # type: ignore[arg-type]
    return SampleLine(seq, ms, st, tuple(out))


def _parse_info(info: Any) -> ParsedLine:
    if type(info) is not dict:
        return _BAD["missing_keys"]

    def num(key: str) -> float:
        x = info.get(key)
        return float(x) if type(x) in (int, float) else _NAN

    chans = info.get("channels")
    return MeterInfo(
        board=str(info.get("board", "")),
        fw=str(info.get("fw", "")),
        serial=str(info.get("serial", "")),
        channels=chans if type(chans) is int else 0,
        rate_hz=num("rate_hz"),
        cal_date=str(info.get("cal_date", "")),
        ct=str(info.get("ct", "")),
        uncertainty_pct=num("uncertainty_pct"),
        raw=info,
        simulated=info.get("simulated") is True,
    )


def command_line(cmd: str, **args: Any) -> bytes:
    """A host-to-device command as one protocol line."""
    return json.dumps({"cmd": cmd, **args}, separators=(",", ":")).encode() + b"\n"


# --------------------------------------------------------------------------------------------------
# Framing


class LineFramer:
    """Split a byte stream into lines of at most ``max_line`` bytes; count overlong ones."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self.overlong = 0
        self._buf = bytearray()
        self._skipping = False

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        buf, cap = self._buf, self.max_line
        start, end = 0, len(data)
        find = data.find
        while True:
            nl = find(b"\n", start)
            if nl < 0:
                break
            if self._skipping:
                self._skipping = False  # the overlong line ends here; it was counted when it overflowed
            elif buf:
                if len(buf) + nl - start > cap:
                    self.overlong += 1
                else:
                    buf += data[start:nl]
                    out.append(bytes(buf))
                buf.clear()
            elif nl - start > cap:
                self.overlong += 1
            else:
                out.append(data[start:nl])
            start = nl + 1
        if start < end and not self._skipping:
            if len(buf) + end - start > cap:
                self.overlong += 1
                buf.clear()
                self._skipping = True
            else:
                buf += data[start:]
        return out

    def reset(self) -> bool:
        """Forget the unfinished line (the port closed); True if one was pending (a partial line)."""
        pending = bool(self._buf)
        self._buf.clear()
        self._skipping = False
        return pending


# --------------------------------------------------------------------------------------------------
# Device clock -> host clock


class ClockFit:
    """Running linear fit ``host = offset + slope * device_seconds``.

    The slope is the least-squares slope over the last ``window`` points, so receive-time jitter
    averages out; the offset is the lower envelope (the smallest ``host - slope * device``) because
    a line can only arrive late, never early. ``residual`` is the RMS scatter of receive times about
    the least-squares line. :meth:`restart` (after a reboot) forgets the points but keeps the slope:
    the board's crystal did not change, and a slope fitted on the first few lines of the new boot
    (a batch or two, all received at once) would be far worse than the one it replaced. The mapped
    times of one boot never go backwards, even where a refit moves the line.
    """

    def __init__(self, window: int = 2048, refit_every: int = 32, min_points: int = 8) -> None:
        self.window = window
        self.refit_every = refit_every
        self.min_points = min_points
        self._d = np.empty(window)
        self._h = np.empty(window)
        self.slope = 1.0
        self.residual = math.nan
        #: Points behind the current slope (0: not fitted yet).
        self._slope_points = 0
        self.restart()

    def restart(self) -> None:
        self._n = 0
        self._i = 0
        self._since = 0
        self._d0 = self._h0 = math.nan
        self._off = math.nan  # offset relative to (d0, h0)
        self._last = -math.inf  # the last mapped time of this boot

    @property
    def points(self) -> int:
        return self._n

    @property
    def offset(self) -> float:
        """Host time at device time 0."""
        if self._n == 0:
            return math.nan
        return self._h0 + self._off - self.slope * self._d0

    def add(self, d: float, h: float) -> float:
        """Add a point (device seconds, receive time) and return ``d`` mapped to host time."""
        if self._n == 0:
            self._d0, self._h0, self._off = d, h, 0.0
        dd, hh = d - self._d0, h - self._h0
        self._d[self._i] = dd
        self._h[self._i] = hh
        self._i = (self._i + 1) % self.window
        if self._n < self.window:
            self._n += 1
        self._since += 1
        # The first fits of the first boot: refit on every point until the slope has some support.
        early = self._slope_points < self.min_points * 4 and self.min_points <= self._n <= self.min_points * 4
        if self._since >= self.refit_every or early:
            self._refit()
        low = hh - self.slope * dd
        if low < self._off:
            self._off = low
        # A refit can move the line under the last mapped point; time within a boot never runs back.
        t = max(self._h0 + self._off + self.slope * dd, self._last)
        self._last = t
        return t

    def map(self, d: float) -> float:
        """Device seconds to host time with the current fit."""
        return self._h0 + self._off + self.slope * (d - self._d0)

    def _refit(self) -> None:
        self._since = 0
        n = self._n
        d, h = self._d[:n], self._h[:n]
        dm = d.mean()
        dc = d - dm
        var = float(dc @ dc)
        if var <= 0.0:
            return
        hm = h.mean()
        slope = float(dc @ (h - hm)) / var
        # After a restart, keep the slope of the previous boot until this one has enough points to
        # beat it (half a window: the window itself may have shrunk in time if the rate went up).
        short = n < min(self._slope_points, self.window // 2)
        if slope > 0.0 and not short:  # a degenerate window gives nonsense: keep the previous slope
            self.slope = slope
            self._slope_points = n
        slope = self.slope
        r = h - slope * d
        self._off = float(r.min())
        self.residual = float(np.sqrt(np.mean((r - r.mean()) ** 2)))


# --------------------------------------------------------------------------------------------------
# The port


class _Protocol(asyncio.Protocol):
    def __init__(self, meter: EpiMeter) -> None:
        self.meter = meter
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.meter._on_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


class EpiMeter:
    """The epi-meter on a serial port. ``await start()``, then ``async for ev in meter.events()``.

    Events are :class:`MeterSample`, :class:`MeterInfo`, :class:`MeterGap` and :class:`MeterState`,
    in wire order, through a bounded queue (one consumer; if it falls behind, the oldest events are
    dropped, counted, and the lost samples reported as an ``overflow`` gap). Commands are matched
    to answers by name, in order; the late answer to a command that timed out is skipped. The port is reopened with exponential backoff (up to ``reconnect_max_s``)
    whenever it fails, reaches EOF or its path vanishes. On every connect it asks for the info line
    (``ask_info``), so :meth:`status` knows the board even when its boot-time line went unheard.
    A reboot is seen from ``ms``/``seq``/``Wh`` going back, and after a disconnect also from the
    device clock lagging the host's by more than ``reboot_lag_s``.
    """

    def __init__(
        self,
        port: str,
        baud: int = 115200,
        *,
        reconnect_max_s: float = 5.0,
        reconnect_min_s: float = 0.05,
        open_timeout_s: float = 5.0,
        path_check_s: float = 0.5,
        queue_size: int = 65536,
        clock_window: int = 2048,
        ask_info: bool = True,
        reboot_lag_s: float = 5.0,
    ) -> None:
        self.port = port
        self.reboot_lag_s = reboot_lag_s
        self.ask_info = ask_info
        self.baud = baud
        self.reconnect_max_s = reconnect_max_s
        self.reconnect_min_s = min(reconnect_min_s, reconnect_max_s)
        self.open_timeout_s = open_timeout_s
        self.path_check_s = path_check_s
        self._queue: asyncio.Queue[MeterEvent | None] = asyncio.Queue(maxsize=queue_size)
        self._framer = LineFramer()
        self.clock = ClockFit(window=clock_window)
        self._task: asyncio.Task[None] | None = None
        self._proto: _Protocol | None = None
        self._closing = False
        self._connected = False
        self._up = asyncio.Event()  # set while connected, for wait_connected
        self._connects = 0
        #: (seq, ms, channel ids, Wh per channel, t) of the last sample.
        self._last: tuple[int, int, tuple[int, ...], tuple[float, ...], float] | None = None
        self._epoch_ms = 0  # added to ms for each uint32 wrap of the device uptime
        self._unplug_t0: float | None = None
        self._info: MeterInfo | None = None
        self._info_waiters: list[asyncio.Future[MeterInfo]] = []
        self._answer_waiters: dict[str, deque[asyncio.Future[CommandAnswer]]] = {}
        self._warned_version = False
        #: Per command, answers still owed to calls that timed out (they are skipped when they come).
        self._unanswered: dict[str, int] = {}
        self._last_error = ""
        self._last_host = math.nan
        self._good = self._samples = self._lost = self._reboots = self._gaps = self._dropped = 0
        # Samples dropped from the queue since the consumer last took one, and where that hole starts.
        self._overflow_lost = 0
        self._overflow_t0 = math.nan
        self._taken_t: float | None = None  # t of the last sample events() handed out
        self._bad = dict.fromkeys(BAD_KINDS, 0)

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the connection task (returns at once; the port may appear later)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"epimeter {self.port}")

    async def close(self, timeout: float = 5.0) -> None:
        """Close the port, stop reconnecting and end :meth:`events` (idempotent)."""
        if self._closing:
            return
        self._closing = True
        proto = self._proto
        if proto is not None and proto.transport is not None:
            proto.transport.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(proto.lost), timeout)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._task, timeout)
            self._task = None
        for fut in self._info_waiters:
            fut.cancel()
        for q in self._answer_waiters.values():
            for fut in q:
                fut.cancel()
        self._emit(None)

    async def __aenter__(self) -> EpiMeter:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def events(self) -> AsyncIterator[MeterEvent]:
        """Events in arrival order until :meth:`close`.

        Where samples were dropped because this consumer fell behind, a ``MeterGap`` with cause
        ``overflow`` comes first, from the last sample handed out to the next one: a hole in the
        record is never bridged silently.
        """
        while True:
            if self._closing and self._queue.empty():
                return
            ev = await self._queue.get()
            if ev is None:
                return
            if type(ev) is MeterSample:
                if self._overflow_lost:
                    t0 = self._overflow_t0 if self._taken_t is None else self._taken_t
                    gap = MeterGap(t0, ev.t, "overflow", self._overflow_lost)
                    self._overflow_lost = 0
                    self._gaps += 1
                    yield gap
                self._taken_t = ev.t
            yield ev

    @property
    def connected(self) -> bool:
        return self._connected

    async def wait_connected(self, timeout: float) -> None:
        """Wait until the port is open; :class:`MeterTimeout` after ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self._up.wait(), timeout)
        except TimeoutError:
            raise MeterTimeout(f"the meter port {self.port} did not open within {timeout:g} s; "
                               "check the cable and meter.port in the lab config") from None

    # -- commands --------------------------------------------------------------------------------

    async def info(self, timeout: float = 2.0) -> MeterInfo:
        """Ask the board for its info line."""
        fut: asyncio.Future[MeterInfo] = asyncio.get_running_loop().create_future()
        self._info_waiters.append(fut)
        try:
            self._send(command_line("info"))
            return await self._await(fut, timeout, "info")
        finally:
            with contextlib.suppress(ValueError):
                self._info_waiters.remove(fut)

    async def set_rate(self, hz: float, timeout: float = 2.0) -> None:
        """Set the sample rate (1-50 Hz); :class:`MeterCommandError` if the board refuses."""
        if not MIN_RATE_HZ <= hz <= MAX_RATE_HZ:
            raise ValueError(f"meter rate must be between {MIN_RATE_HZ:g} and {MAX_RATE_HZ:g} Hz, got {hz:g}")
        value: float | int = int(hz) if float(hz).is_integer() else float(hz)
        answer = await self._command("rate", timeout, hz=value)
        if not answer.ok:
            raise MeterCommandError(f"the meter refused rate {value}: {answer.error or 'no reason given'}")

    async def command(self, cmd: str, timeout: float = 2.0, **args: Any) -> CommandAnswer:
        """Send any command and return the board's answer (ok or not); for commands newer than this driver."""
        return await self._command(cmd, timeout, **args)

    async def _command(self, cmd: str, timeout: float, **args: Any) -> CommandAnswer:
        fut: asyncio.Future[CommandAnswer] = asyncio.get_running_loop().create_future()
        waiters = self._answer_waiters.setdefault(cmd, deque())
        waiters.append(fut)
        try:
            self._send(command_line(cmd, **args))
            return await self._await(fut, timeout, cmd)
        except MeterTimeout:
            # Its answer may still come; answers carry no id, so it would be taken for the next one's.
            self._unanswered[cmd] = self._unanswered.get(cmd, 0) + 1
            raise
        finally:
            with contextlib.suppress(ValueError):
                waiters.remove(fut)

    async def _await(self, fut: asyncio.Future[Any], timeout: float, what: str) -> Any:
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise MeterTimeout(f"the meter did not answer {what!r} within {timeout:g} s; "
                               "check that it runs protocol v1 firmware") from None

    def _send(self, line: bytes) -> None:
        proto = self._proto
        if not self._connected or proto is None or proto.transport is None:
            raise MeterNotConnected(f"the meter on {self.port} is not connected; plug it in or check meter.port")
        proto.transport.write(line)

    # -- status ----------------------------------------------------------------------------------

    def status(self) -> MeterStatus:
        bad = dict(self._bad)
        bad["overlong"] += self._framer.overlong
        c = self.clock
        return MeterStatus(
            port=self.port,
            connected=self._connected,
            good=self._good,
            samples=self._samples,
            bad=bad,
            lost=self._lost,
            reboots=self._reboots,
            reconnects=max(self._connects - 1, 0),
            gaps=self._gaps,
            last_sample_host_time=self._last_host,
            clock_slope=c.slope,
            clock_offset=c.offset,
            clock_residual=c.residual,
            clock_points=c.points,
            dropped_events=self._dropped,
            last_error=self._last_error,
            info=self._info,
        )

    # -- connection task -------------------------------------------------------------------------

    async def _run(self) -> None:
        import serial
        import serial_asyncio_fast

        loop = asyncio.get_running_loop()
        backoff = self.reconnect_min_s
        while not self._closing:
            try:
                proto = _Protocol(self)
                transport, _ = await asyncio.wait_for(
                    serial_asyncio_fast.create_serial_connection(loop, lambda p=proto: p, url=self.port,
                                                                 baudrate=self.baud),
                    self.open_timeout_s,
                )
            except (OSError, serial.SerialException, TimeoutError, ValueError) as exc:
                self._last_error = str(exc) or type(exc).__name__
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.reconnect_max_s)
                continue
            backoff = self.reconnect_min_s
            if self._closing:  # close() ran while the port was opening: it could not see this transport
                transport.close()
                return
            if hasattr(transport, "_max_read_size"):
                # The transport reads 1 KiB per wakeup; after a stall that is two lines per loop turn.
                transport._max_read_size = 65536
            proto.transport = transport
            self._proto = proto
            self._connects += 1
            self._connected = True
            self._up.set()
            self._emit(MeterState(True, self.port, time.time(), "opened" if self._connects == 1 else "reconnected"))
            if self.ask_info:
                # The boot-time info line was sent before we listened (or to a previous host).
                transport.write(command_line("info"))
            try:
                reason = await self._watch(proto)
            except asyncio.CancelledError:
                transport.abort()  # cancelled by close()'s timeout: never leave the port open
                raise
            self._proto = None
            self._connected = False
            self._up.clear()
            if self._framer.reset():
                self._bad["partial"] += 1
            if self._closing:
                self._emit(MeterState(False, self.port, time.time(), "closed"))
                return
            self._last_error = reason
            if self._last is not None and self._unplug_t0 is None:
                self._unplug_t0 = self._last[4]
            self._emit(MeterState(False, self.port, time.time(), reason))
            self._unanswered.clear()  # nothing owed on this connection arrives on the next
            # A command in flight will never be answered on this connection: fail it now, not at its timeout.
            waiting = [*self._info_waiters, *(f for q in self._answer_waiters.values() for f in q)]
            for fut in waiting:
                if not fut.done():
                    fut.set_exception(MeterNotConnected(f"the meter on {self.port} disconnected"))

    async def _watch(self, proto: _Protocol) -> str:
        """Wait until the connection ends; a vanished device path ends it too. Returns why it ended."""
        while True:
            try:
                exc = await asyncio.wait_for(asyncio.shield(proto.lost), self.path_check_s)
            except TimeoutError:
                transport = proto.transport
                # pyserial URL ports (socket://, rfc2217://) have no path to watch.
                if "://" not in self.port and not os.path.exists(self.port) and transport is not None:
                    if not transport.is_closing():  # a read error may have started closing it already
                        transport.abort()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(proto.lost), self.open_timeout_s)
                    return "port vanished"
                continue
            if exc is None:
                return "closed" if self._closing else "end of file"
            return str(exc) or type(exc).__name__

    # -- receiving -------------------------------------------------------------------------------

    def _emit(self, ev: MeterEvent | None) -> None:
        q = self._queue
        if q.full():  # the consumer fell behind: drop the oldest, count it (events() reports the hole)
            old = q.get_nowait()
            self._dropped += 1
            if type(old) is MeterSample:
                if not self._overflow_lost:
                    self._overflow_t0 = old.t
                self._overflow_lost += 1
        q.put_nowait(ev)

    def _on_data(self, data: bytes) -> None:
        host = time.time()
        for line in self._framer.feed(data):
            r = parse_line(line)
            tp = type(r)
            if tp is SampleLine:
                self._good += 1
                self._on_sample(r, host)  # type: ignore[arg-type]
            elif tp is BadLine:
                kind = r.kind  # type: ignore[union-attr]
                self._bad[kind] += 1
                if kind == "unsupported_version" and not self._warned_version:
                    self._warned_version = True
                    log.warning("epi-meter on %s speaks an unsupported protocol version; lines skipped", self.port)
            elif tp is MeterInfo:
                self._good += 1
                self._info = r  # type: ignore[assignment]
                for fut in self._info_waiters:
                    if not fut.done():
                        fut.set_result(r)
                self._emit(r)  # type: ignore[arg-type]
            else:
                self._good += 1
                ans: CommandAnswer = r  # type: ignore[assignment]
                if self._unanswered.get(ans.cmd):
                    self._unanswered[ans.cmd] -= 1  # the late answer to a command that timed out
                    continue
                waiters = self._answer_waiters.get(ans.cmd)
                while waiters:
                    fut = waiters.popleft()
                    if not fut.done():
                        fut.set_result(ans)
                        break

    def _on_sample(self, s: SampleLine, host: float) -> None:
        chans = s.channels
        ids = tuple([c[0] for c in chans])
        wh = tuple([c[7] for c in chans])
        reboot = False
        lost = 0
        last = self._last
        if last is not None:
            l_seq, l_ms, l_ids, l_wh, l_t = last
            dseq = (s.seq - l_seq) % U32
            if ids == l_ids:
                wh_back = any(map(operator.lt, wh, l_wh))
            else:  # channels came and went: compare the ones both lines carry
                prev = dict(zip(l_ids, l_wh, strict=True))
                wh_back = any(w < prev[i] for i, w in zip(ids, wh, strict=True) if i in prev)
            if s.ms < l_ms:
                # uint32 wrap of the uptime (every 49.7 days): high to low, seq moving on, energy not reset.
                if l_ms - s.ms > _HALF and 0 < dseq < _HALF and not wh_back:
                    self._epoch_ms += U32
                else:
                    reboot = True
            elif wh_back or dseq >= _HALF:
                reboot = True
            if 1 < dseq < _HALF:
                lost = dseq - 1
            elif reboot and dseq >= _HALF:
                lost = s.seq  # seq restarted at 0 on boot: the first s.seq lines never arrived
            if not reboot and self._unplug_t0 is not None:
                # Back after a disconnect with ms, seq and Wh all moved on, yet the device clock
                # advanced far less than the host's: the board restarted meanwhile (a USB-powered
                # board does on every unplug) and its new uptime already passed the old one. Left
                # undetected, the old clock fit would date these samples seconds in the past.
                lag = host - self.clock.map((self._epoch_ms + s.ms) / 1000.0)
                if lag > self.reboot_lag_s:
                    reboot, lost = True, s.seq
        if reboot:
            self._reboots += 1
            self._epoch_ms = 0
            self.clock.restart()
        t = self.clock.add((self._epoch_ms + s.ms) / 1000.0, host)
        if self._unplug_t0 is not None:
            self._gap(MeterGap(self._unplug_t0, t, "unplug", lost))
            self._unplug_t0 = None
        elif reboot:
            self._gap(MeterGap(l_t, t, "reboot", lost))
        elif lost:
            self._gap(MeterGap(l_t, t, "seq_jump", lost))
        self._lost += lost
        self._samples += 1
        self._last_host = host
        self._last = (s.seq, s.ms, ids, wh, t)
        self._emit(MeterSample(s.seq, s.ms, s.st, chans, host, t))

    def _gap(self, gap: MeterGap) -> None:
        self._gaps += 1
        self._emit(gap)


__all__ = [
    "BAD_KINDS",
    "CHANNEL_FIELDS",
    "MAX_LINE",
    "BadLine",
    "ChannelReading",
    "ClockFit",
    "CommandAnswer",
    "EpiMeter",
    "LineFramer",
    "MeterCommandError",
    "MeterError",
    "MeterEvent",
    "MeterGap",
    "MeterInfo",
    "MeterNotConnected",
    "MeterSample",
    "MeterState",
    "MeterStatus",
    "MeterTimeout",
    "SampleLine",
    "command_line",
    "parse_line",
]
