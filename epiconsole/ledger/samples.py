"""Meter samples as columns (:class:`SampleBlock`) and their compact on-disk packing.

A tick is one meter line: host time ``t`` (already mapped from the board's ``ms`` by the driver's clock
fit), ``seq``, device ``ms``, board status ``st`` and, per channel, ``V A W VAR PF Hz Wh``. A block holds
``n`` ticks of ``c`` channels as numpy arrays: ``t`` (float64), ``seq``/``ms``/``st`` (int64), each
channel quantity as float64 of shape ``(n, c)`` with NaN where a channel is missing.

On disk a tick is one packed little-endian record (122 bytes for 4 channels, 30.5 bytes per channel
sample): ``t seq ms st`` then per channel ``V A W VAR PF Hz Wh``, the order the meter sends them. Quantities the ATM90E26 reports as 16-bit registers with a fixed range are stored as scaled
integers at the chip's own resolution, so real meter data round-trips exactly: V in 0.01 V (to
655 V), PF in 0.001, Hz in 0.01 Hz (finer values, as a simulator may send, are rounded to that
resolution; values beyond the range saturate). A, W and VAR are float32 (beyond its range: inf) (their range depends on the
CT clamp, and the board may refine the 1 W register); Wh is float64 because the cumulative counter
needs it; ``t`` is float64 epoch seconds. Missing values are stored as the integer types' sentinel
(or NaN) and come back as NaN, never 0.
"""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

#: Per-channel quantities, in the order of a channel tuple in :meth:`SampleBlock.from_ticks`.
CHANNEL_FIELDS: tuple[str, ...] = ("V", "A", "W", "VAR", "PF", "Hz", "Wh")
#: Per-tick fields.
TICK_FIELDS: tuple[str, ...] = ("t", "seq", "ms", "st")
#: Scaled-integer storage: field -> (numpy type, resolution, missing sentinel).
_SCALED: dict[str, tuple[str, float, int]] = {
    "V": ("<u2", 0.01, 0xFFFF),
    "PF": ("<i2", 0.001, -0x8000),
    "Hz": ("<u2", 0.01, 0xFFFF),
}
_FLOAT: dict[str, str] = {"A": "<f4", "W": "<f4", "VAR": "<f4", "Wh": "<f8"}

_NAN7 = (math.nan,) * len(CHANNEL_FIELDS)
_COUNTER_MOD = np.array([2.0**32, 2.0**32, 2.0**16])


@lru_cache(maxsize=64)
def _row_lengths(n: int, channels: int) -> list[int]:
    return ([4] + [len(CHANNEL_FIELDS)] * channels) * n


@lru_cache(maxsize=8)
def channel_dtype() -> np.dtype:
    """The packed on-disk values of one channel in one tick."""
    return np.dtype(
        [(name, _SCALED[name][0] if name in _SCALED else _FLOAT[name]) for name in CHANNEL_FIELDS]
    )


@lru_cache(maxsize=8)
def tick_dtype(channels: int) -> np.dtype:
    """The packed on-disk record of one tick with ``channels`` channels (no padding)."""
    return np.dtype(
        [("t", "<f8"), ("seq", "<u4"), ("ms", "<u4"), ("st", "<u2"), ("ch", channel_dtype(), (channels,))]
    )


def _f64(a: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    arr = np.ascontiguousarray(a, dtype=np.float64)
    if arr.shape != shape:
        raise ValueError(f"SampleBlock.{name} has shape {arr.shape}, expected {shape}")
    return arr


def _i64(a: Any, n: int, name: str) -> np.ndarray:
    arr = np.ascontiguousarray(a, dtype=np.int64)
    if arr.shape != (n,):
        raise ValueError(f"SampleBlock.{name} has shape {arr.shape}, expected {(n,)}")
    return arr


@dataclass(frozen=True, eq=False)
class SampleBlock:
    """``n`` meter ticks of ``c`` channels, column-wise. Build with :meth:`from_ticks` or :meth:`from_arrays`.

    Arrays are treated as immutable; methods return new blocks. Ticks are kept in the order given;
    blocks read from the ledger are in time order.
    """

    t: np.ndarray
    seq: np.ndarray
    ms: np.ndarray
    st: np.ndarray
    V: np.ndarray
    A: np.ndarray
    W: np.ndarray
    VAR: np.ndarray
    PF: np.ndarray
    Hz: np.ndarray
    Wh: np.ndarray
    #: The ticks as one float64 matrix in record layout ``[t seq ms st, ch0 V..Wh, ch1 ...]`` when built
    #: by from_ticks; the arrays above are views into it, and packing starts from it.
    _flat: np.ndarray | None = field(default=None, repr=False, compare=False)

    # ---------------------------------------------------------------------------------- construction

    @classmethod
    def from_arrays(
        cls,
        t: Any,
        *,
        seq: Any = None,
        ms: Any = None,
        st: Any = None,
        channels: int | None = None,
        **quantities: Any,
    ) -> SampleBlock:
        """Build from arrays, converting dtypes and checking shapes.

        ``seq``/``ms``/``st`` default to zeros; each of ``V A W VAR PF Hz Wh`` is an ``(n, c)`` array
        and defaults to NaN (missing). ``channels`` is needed only when no quantity is given.
        """
        unknown = set(quantities) - set(CHANNEL_FIELDS)
        if unknown:
            raise TypeError(f"unknown sample quantities: {sorted(unknown)}")
        tt = np.ascontiguousarray(t, dtype=np.float64).reshape(-1)
        n = tt.shape[0]
        if not np.all(np.isfinite(tt)):
            raise ValueError("sample times must be finite")
        if channels is None:
            given = [np.asarray(v) for v in quantities.values()]
            channels = given[0].shape[1] if given and given[0].ndim == 2 else 4
        shape = (n, channels)
        zeros = np.zeros(n, dtype=np.int64)
        cols = {
            name: (
                _f64(quantities[name], shape, name)
                if name in quantities
                else np.full(shape, np.nan, dtype=np.float64)
            )
            for name in CHANNEL_FIELDS
        }
        return cls(
            t=tt,
            seq=zeros if seq is None else _i64(seq, n, "seq"),
            ms=zeros if ms is None else _i64(ms, n, "ms"),
            st=zeros if st is None else _i64(st, n, "st"),
            **cols,
        )

    @classmethod
    def from_ticks(
        cls,
        ticks: Sequence[tuple[float, int, int, int, Sequence[Sequence[float] | None]]],
        channels: int = 4,
    ) -> SampleBlock:
        """Build from per-tick values ``(t, seq, ms, st, chans)`` as the service receives them.

        ``chans`` has one entry per channel: a 7-sequence in :data:`CHANNEL_FIELDS` order, or ``None``
        for a channel missing from that line (stored as NaN). Use NaN for a single missing quantity.

        Small blocks (the service's commit every 100-250 ms) keep the values as given: they are packed
        straight from them, and the arrays are built only if someone reads them.
        """
        if len(ticks) > LAZY_MAX_TICKS:
            return cls._from_ticks_numpy(ticks, channels)
        nq = len(CHANNEL_FIELDS)
        for tk in ticks:
            chans = tk[4]
            if len(chans) != channels:
                raise ValueError(f"every tick needs {channels} channels")
            for ch in chans:
                if ch is not None and len(ch) != nq:
                    raise ValueError(f"every channel needs {nq} numbers")
            if not math.isfinite(tk[0]):
                raise ValueError("sample times must be finite")
        return _TickBlock(list(ticks), channels)

    @classmethod
    def _from_ticks_numpy(
        cls,
        ticks: Sequence[tuple[float, int, int, int, Sequence[Sequence[float] | None]]],
        channels: int = 4,
    ) -> SampleBlock:
        """:meth:`from_ticks` building the arrays at once (one pass into a float64 matrix)."""
        n = len(ticks)
        if n == 0:
            return cls.empty(channels)
        nq = len(CHANNEL_FIELDS)
        width = 4 + nq * channels
        # One flat pass over the Python values (the service's hot path): per tick its 4 head values,
        # then each channel's 7, checked by their lengths.
        rows: list[Sequence[float]] = []
        for tk in ticks:
            chans = tk[4]
            rows.append(tk[:4])
            if None in chans:
                rows.extend(_NAN7 if ch is None else ch for ch in chans)
            else:
                rows.extend(chans)
        if list(map(len, rows)) != _row_lengths(n, channels):
            raise ValueError(f"every tick needs 4 values and {channels} channels of {nq} numbers")
        try:
            raw = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.float64, count=n * width).reshape(
                n, width
            )
        except (ValueError, TypeError) as exc:
            raise ValueError(f"sample values must be numbers ({exc})") from None
        t = raw[:, 0]
        if not np.all(np.isfinite(t)):
            raise ValueError("sample times must be finite")
        ints = raw[:, 1:4].astype(np.int64)
        q = raw[:, 4:].reshape(n, channels, nq)
        return cls(t, ints[:, 0], ints[:, 1], ints[:, 2], *(q[:, :, k] for k in range(nq)), _flat=raw)

    @classmethod
    def empty(cls, channels: int = 4) -> SampleBlock:
        return cls.from_arrays(np.empty(0), channels=channels)

    @staticmethod
    def concat(blocks: Iterable[SampleBlock]) -> SampleBlock:
        """Ticks of all ``blocks`` in order (they must have the same channel count)."""
        blocks = [b for b in blocks]
        if not blocks:
            return SampleBlock.empty()
        nonempty = [b for b in blocks if b.n] or blocks[:1]
        if len(nonempty) == 1:
            return nonempty[0]
        channels = {b.channels for b in nonempty}
        if len(channels) != 1:
            raise ValueError(f"cannot concatenate blocks with different channel counts {sorted(channels)}")
        return SampleBlock(
            **{
                name: np.concatenate([getattr(b, name) for b in nonempty])
                for name in TICK_FIELDS + CHANNEL_FIELDS
            }
        )

    # ------------------------------------------------------------------------------------- access

    @property
    def n(self) -> int:
        return int(self.t.shape[0])

    @property
    def channels(self) -> int:
        return int(self.W.shape[1])

    def __len__(self) -> int:
        return self.n

    def take(self, index: Any) -> SampleBlock:
        """The ticks selected by a slice, boolean mask or index array."""
        return SampleBlock(**{name: getattr(self, name)[index] for name in TICK_FIELDS + CHANNEL_FIELDS})

    def slice_time(self, t0: float, t1: float) -> SampleBlock:
        """Ticks with ``t0 <= t <= t1``."""
        if self.n and t0 <= self.t[0] and self.t[-1] <= t1:
            return self
        if self.n > 1 and bool(np.all(self.t[1:] >= self.t[:-1])):
            # Ordered (as read from the ledger): a slice, no copies.
            lo = np.searchsorted(self.t, t0, side="left")
            hi = np.searchsorted(self.t, t1, side="right")
            return self.take(slice(int(lo), int(hi)))
        return self.take((self.t >= t0) & (self.t <= t1))

    def sorted_by_time(self) -> SampleBlock:
        """The same ticks in time order (stable; returns self when already ordered)."""
        if self.n < 2 or bool(np.all(self.t[1:] >= self.t[:-1])):
            return self
        return self.take(np.argsort(self.t, kind="stable"))

    def equals(self, other: SampleBlock) -> bool:
        """Same ticks and values (NaN equals NaN)."""
        return all(
            np.array_equal(getattr(self, f), getattr(other, f), equal_nan=f in CHANNEL_FIELDS or f == "t")
            for f in TICK_FIELDS + CHANNEL_FIELDS
        )

    # ------------------------------------------------------------------------------------ packing

    def pack(self) -> np.ndarray:
        """The ticks as packed records of :func:`tick_dtype` (see the module doc for resolutions)."""
        n, c = self.n, self.channels
        plan = _pack_plan(c)
        # Everything goes through one float64 matrix laid out like the record, scaled with row-wide
        # masks and cast by one astype(), field by field in C: few numpy calls, which is what counts
        # for the small batches of the service's hot path.
        if self._flat is not None:
            flat = self._flat.copy()
        else:
            flat = np.empty((n, 4 + len(CHANNEL_FIELDS) * c), dtype=np.float64)
            flat[:, 0] = self.t
            flat[:, 1] = self.seq
            flat[:, 2] = self.ms
            flat[:, 3] = self.st
            q = flat[:, 4:].reshape(n, c, len(CHANNEL_FIELDS))
            for k, name in enumerate(CHANNEL_FIELDS):
                q[:, :, k] = getattr(self, name)
        # The board's counters are uint32 (st 16 bits) and wrap: keep them in range, exactly.
        np.mod(flat[:, 1:4], _COUNTER_MOD, out=flat[:, 1:4])
        flat *= plan.scale
        missing = np.isnan(flat)
        missing &= plan.scaled
        np.rint(flat, out=flat, where=plan.scaled)
        np.clip(flat, plan.lo, plan.hi, out=flat)
        np.copyto(flat, plan.sentinel, where=missing)
        with np.errstate(over="ignore", invalid="ignore"):  # beyond float32: inf, as documented
            return flat.view(plan.f64).reshape(n).astype(plan.dtype)

    def pack_bytes(self) -> bytes:
        """The packed records as bytes (what the ledger stores)."""
        return self.pack().tobytes()

    @classmethod
    def unpack(cls, rec: np.ndarray, fields: Iterable[str] | None = None) -> SampleBlock:
        """Inverse of :meth:`pack`.

        ``fields`` limits which channel quantities are decoded (decoding is most of the cost of a
        long read); the others come back as read-only all-NaN arrays that take no memory.
        """
        wanted = set(CHANNEL_FIELDS if fields is None else fields)
        unknown = wanted - set(CHANNEL_FIELDS)
        if unknown:
            raise ValueError(f"unknown sample quantities: {sorted(unknown)}")
        ch = rec["ch"]
        cols: dict[str, np.ndarray] = {
            "t": rec["t"].astype(np.float64),
            "seq": rec["seq"].astype(np.int64),
            "ms": rec["ms"].astype(np.int64),
            "st": rec["st"].astype(np.int64),
        }
        for name in CHANNEL_FIELDS:
            raw = ch[name]
            if name not in wanted:
                cols[name] = np.broadcast_to(np.float64(np.nan), raw.shape)
            elif name in _SCALED:
                _kind, res, sentinel = _SCALED[name]
                out = raw * res
                out[raw == sentinel] = np.nan
                cols[name] = out
            else:
                cols[name] = raw.astype(np.float64)
        return cls(**cols)

    @classmethod
    def from_bytes(cls, data: bytes, channels: int, fields: Iterable[str] | None = None) -> SampleBlock:
        return cls.unpack(np.frombuffer(data, dtype=tick_dtype(channels)), fields)


@dataclass(frozen=True)
class _PackPlan:
    """Row-wide constants for packing a float64 matrix in record layout."""

    dtype: np.dtype  # the record
    f64: np.dtype  # the same layout with every field float64
    scaled: np.ndarray  # bool: column stored as a scaled integer
    scale: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    sentinel: np.ndarray


@lru_cache(maxsize=8)
def _pack_plan(channels: int) -> _PackPlan:
    dtype = tick_dtype(channels)
    chan64 = np.dtype([(name, "<f8") for name in CHANNEL_FIELDS])
    f64 = np.dtype([("t", "<f8"), ("seq", "<f8"), ("ms", "<f8"), ("st", "<f8"), ("ch", chan64, (channels,))])
    scaled, scale, lo, hi, sentinel = [False] * 4, [1.0] * 4, [-np.inf] * 4, [np.inf] * 4, [0.0] * 4
    for _ in range(channels):
        for name in CHANNEL_FIELDS:
            if name in _SCALED:
                kind, res, miss = _SCALED[name]
                info = np.iinfo(kind)
                # The sentinel is one end of the range; keep real values off it.
                low, high = (info.min + 1, info.max) if miss == info.min else (info.min, info.max - 1)
                scaled.append(True)
                scale.append(1.0 / res)
                lo.append(low)
                hi.append(high)
                sentinel.append(miss)
            else:
                scaled.append(False)
                scale.append(1.0)
                lo.append(-np.inf)
                hi.append(np.inf)
                sentinel.append(0.0)
    arr = lambda v: np.array(v, dtype=np.float64)  # noqa: E731
    return _PackPlan(dtype, f64, np.array(scaled), arr(scale), arr(lo), arr(hi), arr(sentinel))


class _TickBlock(SampleBlock):
    """A :class:`SampleBlock` holding the per-tick values it was built from.

    Packing goes straight from those values through :mod:`struct` (for a dozen ticks that is several
    times cheaper than building arrays first); the arrays are built on first access.
    """

    def __init__(self, ticks: list[Any], channels: int) -> None:  # noqa: D107 - see class doc
        object.__setattr__(self, "_ticks", ticks)
        object.__setattr__(self, "_nch", channels)
        object.__setattr__(self, "_block", None)
        object.__setattr__(self, "_times", None)

    def _arrays(self) -> SampleBlock:
        if self._block is None:
            object.__setattr__(self, "_block", SampleBlock._from_ticks_numpy(self._ticks, self._nch))
        return self._block

    def __repr__(self) -> str:
        return f"SampleBlock(n={self.n}, channels={self.channels}, from ticks)"

    @property
    def n(self) -> int:
        return len(self._ticks)

    @property
    def channels(self) -> int:
        return self._nch

    @property
    def t(self) -> np.ndarray:  # type: ignore[override]
        # The ledger needs only the times to place a commit: no need to build the other arrays.
        if self._block is not None:
            return self._block.t
        if self._times is None:
            object.__setattr__(self, "_times", np.array([tk[0] for tk in self._ticks], dtype=np.float64))
        return self._times

    seq = property(lambda self: self._arrays().seq)  # type: ignore[assignment]
    ms = property(lambda self: self._arrays().ms)  # type: ignore[assignment]
    st = property(lambda self: self._arrays().st)  # type: ignore[assignment]
    V = property(lambda self: self._arrays().V)  # type: ignore[assignment]
    A = property(lambda self: self._arrays().A)  # type: ignore[assignment]
    W = property(lambda self: self._arrays().W)  # type: ignore[assignment]
    VAR = property(lambda self: self._arrays().VAR)  # type: ignore[assignment]
    PF = property(lambda self: self._arrays().PF)  # type: ignore[assignment]
    Hz = property(lambda self: self._arrays().Hz)  # type: ignore[assignment]
    Wh = property(lambda self: self._arrays().Wh)  # type: ignore[assignment]
    _flat = property(lambda self: self._arrays()._flat)  # type: ignore[assignment]

    def pack_bytes(self) -> bytes:
        return _pack_ticks(self._ticks, self._nch)

    def pack(self) -> np.ndarray:
        return np.frombuffer(self.pack_bytes(), dtype=tick_dtype(self._nch))


#: Blocks up to this many ticks built by from_ticks are packed from the values (see _TickBlock).
LAZY_MAX_TICKS = 256
_M32 = 0xFFFFFFFF
_F32_MAX = 3.4028234663852886e38


@lru_cache(maxsize=8)
def _tick_struct(channels: int) -> struct.Struct:
    """:func:`tick_dtype` as a struct format (same bytes)."""
    return struct.Struct("<dIIH" + "HfffhHd" * channels)


def _pack_ticks(ticks: Sequence[Any], channels: int) -> bytes:
    """Per-tick values -> packed records, byte for byte what :meth:`SampleBlock.pack` makes."""
    pack = _tick_struct(channels).pack
    parts = []
    for tk in ticks:
        try:
            t, seq, ms, st, chans = tk
            vals = [t, seq & _M32, ms & _M32, st & 0xFFFF]
            for V, A, W, VAR, PF, Hz, Wh in chans:
                v, p, h = round(V * 100.0), round(PF * 1000.0), round(Hz * 100.0)
                if v >= 0xFFFF or h >= 0xFFFF or p <= -0x8000:
                    raise OverflowError  # the missing-value sentinels: take the careful path
                vals += (v, A, W, VAR, p, h, Wh)
            parts.append(pack(*vals))
        except (ValueError, TypeError, OverflowError, struct.error):
            # NaN, None, out of range, odd types: the rare tick, value by value.
            parts.append(_pack_tick_careful(pack, tk))
    return b"".join(parts)


def _scaled(x: float, scale: float, lo: int, hi: int, missing: int) -> int:
    if x != x:  # NaN
        return missing
    return round(min(max(x * scale, lo), hi))


def _f32(x: float) -> float:
    return math.copysign(math.inf, x) if math.isfinite(x) and abs(x) > _F32_MAX else x


def _pack_tick_careful(pack: Any, tk: Any) -> bytes:
    try:
        t, seq, ms, st, chans = tk
        vals: list[float | int] = [float(t), int(seq) % 2**32, int(ms) % 2**32, int(st) % 2**16]
        for ch in chans:
            V, A, W, VAR, PF, Hz, Wh = _NAN7 if ch is None else (float(x) for x in ch)
            vals += (
                _scaled(V, 100.0, 0, 0xFFFE, 0xFFFF),
                _f32(A),
                _f32(W),
                _f32(VAR),
                _scaled(PF, 1000.0, -0x7FFF, 0x7FFF, -0x8000),
                _scaled(Hz, 100.0, 0, 0xFFFE, 0xFFFF),
                Wh,
            )
        return pack(*vals)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"sample values must be numbers ({exc})") from None


def resolution(name: str) -> float:
    """Storage resolution of a channel quantity (0.0 for float-stored ones)."""
    return _SCALED[name][1] if name in _SCALED else 0.0
