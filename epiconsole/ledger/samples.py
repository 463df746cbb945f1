"""Meter samples as columns (:class:`SampleBlock`) and their compact on-disk packing.

A tick is one meter line: host time ``t`` (already mapped from the board's ``ms`` by the driver's clock
fit), ``seq``, device ``ms``, board status ``st`` and, per channel, ``V A W VAR PF Hz Wh``. A block holds
``n`` ticks of ``c`` channels as numpy arrays: ``t`` (float64), ``seq``/``ms``/``st`` (int64), each
channel quantity as float64 of shape ``(n, c)`` with NaN where a channel is missing.

On disk a tick is one packed little-endian record (114 bytes for 4 channels, 28.5 bytes per channel
sample). Quantities the ATM90E26 reports as 16-bit registers are stored as scaled integers at the
chip's own resolution, so real meter data round-trips exactly: V in 0.01 V, A in 0.001 A, PF in 0.001,
Hz in 0.01 Hz (finer values, as a simulator may send, are rounded to that resolution; values beyond
the register's range saturate). W and VAR are float32 (the board may refine the 1 W register); Wh is
float64 because the cumulative counter needs it; ``t`` is float64 epoch seconds. Missing values are
stored as the integer types' sentinel (or NaN) and come back as NaN, never 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
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
    "A": ("<u2", 0.001, 0xFFFF),
    "PF": ("<i2", 0.001, -0x8000),
    "Hz": ("<u2", 0.01, 0xFFFF),
}
_FLOAT: dict[str, str] = {"W": "<f4", "VAR": "<f4", "Wh": "<f8"}

_NAN7 = (math.nan,) * len(CHANNEL_FIELDS)


@lru_cache(maxsize=8)
def tick_dtype(channels: int) -> np.dtype:
    """The packed on-disk record of one tick with ``channels`` channels (no padding)."""
    fields: list[tuple[Any, ...]] = [("t", "<f8"), ("seq", "<u4"), ("ms", "<u4"), ("st", "<u2")]
    for name in CHANNEL_FIELDS:
        kind = _SCALED[name][0] if name in _SCALED else _FLOAT[name]
        fields.append((name, kind, (channels,)))
    return np.dtype(fields)


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
        """
        n = len(ticks)
        if n == 0:
            return cls.empty(channels)
        head = np.array([tk[:4] for tk in ticks], dtype=np.float64)
        try:
            vals = np.array(
                [_NAN7 if ch is None else ch for tk in ticks for ch in tk[4]], dtype=np.float64
            ).reshape(n, channels, len(CHANNEL_FIELDS))
        except ValueError as exc:
            raise ValueError(
                f"every tick needs {channels} channels of {len(CHANNEL_FIELDS)} values ({exc})"
            ) from None
        return cls.from_arrays(
            head[:, 0],
            seq=head[:, 1],
            ms=head[:, 2],
            st=head[:, 3],
            **{name: vals[:, :, i] for i, name in enumerate(CHANNEL_FIELDS)},
        )

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
        rec = np.empty(self.n, dtype=tick_dtype(self.channels))
        rec["t"] = self.t
        # The board's counters are uint32 and wrap; anything else is masked into that range.
        rec["seq"] = self.seq & 0xFFFFFFFF
        rec["ms"] = self.ms & 0xFFFFFFFF
        rec["st"] = self.st & 0xFFFF
        for name, (kind, res, sentinel) in _SCALED.items():
            info = np.iinfo(kind)
            lo, hi = info.min, info.max
            # The sentinel is one end of the range; keep it out of reach of real values.
            lo, hi = (lo + 1, hi) if sentinel == lo else (lo, hi - 1)
            raw = getattr(self, name)
            scaled = np.rint(raw * (1.0 / res))
            missing = np.isnan(scaled)
            with np.errstate(invalid="ignore"):
                np.clip(scaled, lo, hi, out=scaled)
            scaled[missing] = sentinel
            rec[name] = scaled
        for name in _FLOAT:
            rec[name] = getattr(self, name)
        return rec

    @classmethod
    def unpack(cls, rec: np.ndarray) -> SampleBlock:
        """Inverse of :meth:`pack`."""
        cols: dict[str, np.ndarray] = {
            "t": rec["t"].astype(np.float64),
            "seq": rec["seq"].astype(np.int64),
            "ms": rec["ms"].astype(np.int64),
            "st": rec["st"].astype(np.int64),
        }
        for name, (_kind, res, sentinel) in _SCALED.items():
            raw = rec[name]
            out = raw * res
            out[raw == sentinel] = np.nan
            cols[name] = out
        for name in _FLOAT:
            cols[name] = rec[name].astype(np.float64)
        return cls(**cols)

    @classmethod
    def from_bytes(cls, data: bytes, channels: int) -> SampleBlock:
        return cls.unpack(np.frombuffer(data, dtype=tick_dtype(channels)))


def resolution(name: str) -> float:
    """Storage resolution of a channel quantity (0.0 for float-stored ones)."""
    return _SCALED[name][1] if name in _SCALED else 0.0
