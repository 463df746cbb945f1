"""The ledger: one SQLite file (WAL) written by the lab service and read by any number of viewers.

Durability: the writer runs ``journal_mode=WAL`` with ``synchronous=NORMAL``. Every commit is in the
WAL file when the call returns, so it survives the process being killed (SIGKILL included). A power
cut or kernel crash may lose the last commits (they are lost in order, never half, and the file stays
consistent): for stage checkpoints that means a stage runs again after such a crash.

Concurrency: exactly one writer process. Inside it, all writes go through one asyncio lock, so a
multi-statement :meth:`Ledger.transaction` is never interleaved with another task's write; write
methods called inside ``transaction()`` by the same task join it. Viewers open with ``readonly=True``
and read while the writer writes (WAL readers never block); each query sees one consistent snapshot.
The one write a viewer makes, :meth:`Ledger.put_command`, goes through a short-lived connection of
its own.

Threads: statements run in aiosqlite's worker thread, except the service's small sample commits
(:meth:`Ledger.insert_samples` of up to ``FAST_MAX_TICKS`` ticks outside a transaction). Those run on
the event loop thread through a second connection: ~0.05 ms of work that never waits for a lock
(``busy_timeout=0``; when busy, the threaded path takes over) and leaves WAL checkpoints (the fsyncs)
to the worker thread. Two thread hops would cost more than the commit itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiosqlite
import numpy as np

from epiconsole.errors import UserError
from epiconsole.ledger.records import (
    CHECKPOINT_STATUSES,
    EVENT_LEVELS,
    Campaign,
    Checkpoint,
    Command,
    Event,
    Gap,
    LiveEntry,
    Marker,
    SampleCursor,
    Trial,
    TrialResult,
)
from epiconsole.ledger.samples import SampleBlock, tick_dtype
from epiconsole.ledger.schema import MIGRATIONS, SCHEMA_VERSION

#: A chunk of ticks never spans more time than this, so time queries can bound their index range.
MAX_CHUNK_SPAN_S = 60.0
#: How long a statement waits for a lock held by another connection before failing.
BUSY_TIMEOUT_S = 5.0
#: Address space a read-only connection may map (long sample reads skip a copy per page).
READER_MMAP_BYTES = 256 * 1024 * 1024
#: Retention keeps this much beyond every trial window: the ticks that cover the window's ends.
PRUNE_MARGIN_S = MAX_CHUNK_SPAN_S
#: Sample commits up to this many ticks run on the event loop thread (see Ledger.insert_samples).
FAST_MAX_TICKS = 64
#: Those commits leave WAL checkpoints to the threaded connection, asked for this often.
FAST_CHECKPOINT_EVERY = 256

_UNSET: Any = object()


class LedgerError(UserError):
    """The ledger file cannot be used as asked (missing, wrong version, read-only)."""


# ------------------------------------------------------------------------------------------ JSON


def _plain(obj: Any) -> Any:
    """JSON-ready copy: NaN/inf become None (missing is null, never 0), numpy scalars become Python."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, str | bool | int):
        return obj
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return _plain(obj.item())
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _plain(dataclasses.asdict(obj))
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot store a {type(obj).__name__} in the ledger as JSON")


def _dumps(obj: Any) -> str:
    return json.dumps(_plain(obj), separators=(",", ":"), allow_nan=False)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


# ------------------------------------------------------------------------------------------ Ledger


@dataclasses.dataclass
class _Tail:
    chunk_id: int
    t_first: float
    t_last: float
    n: int
    nch: int


class Ledger:
    """Async access to the ledger file. Open with :meth:`open` (or ``async with await Ledger.open(...)``)."""

    def __init__(self, db: aiosqlite.Connection, path: Path, readonly: bool) -> None:
        self._db = db
        self.path = path
        self.readonly = readonly
        self._lock = asyncio.Lock()
        self._tx_task: asyncio.Task[Any] | None = None
        self._tail: _Tail | None = None
        self._next_chunk_id = 1
        self._page_size = 4096
        #: Second connection for small sample commits, used on the event loop thread (see insert_samples).
        self._fast: sqlite3.Connection | None = None
        self._fast_commits = 0

    # ------------------------------------------------------------------------------ open / close

    @classmethod
    async def open(cls, path: str | Path, *, readonly: bool = False) -> Ledger:
        """Open (and for the writer create or upgrade) the ledger at ``path``.

        Readonly opens are for viewers: they need an existing ledger at the current schema version
        and work while the writer is writing.
        """
        path = Path(path).expanduser()
        if readonly and not path.exists():
            raise LedgerError(f"No ledger at {path}: start a run or the lab service first.")
        if path.is_dir():
            raise LedgerError(f"{path} is a directory; give the ledger a file name inside it (e.g. {path / 'ledger.sqlite'}).")
        try:
            if readonly:
                db = await aiosqlite.connect(f"file:{quote(str(path))}?mode=ro", uri=True, isolation_level=None)
                # Viewers read long sample ranges: mapping the file spares copying every page.
                await db.execute(f"PRAGMA mmap_size = {READER_MMAP_BYTES}")
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                db = await aiosqlite.connect(str(path), isolation_level=None)
        except (OSError, sqlite3.DatabaseError) as exc:
            raise LedgerError(f"Cannot open the ledger {path} ({exc}); check the path and its permissions.") from None
        ledger = cls(db, path, readonly)
        try:
            await ledger._setup()
        except sqlite3.DatabaseError as exc:
            # A user's mistake (the path names some other file), not ours: one sentence, no traceback.
            await ledger.close()
            raise LedgerError(
                f"{path} is not a readable epiconsole ledger ({exc}); point the config's ledger path or "
                "--ledger at the right file."
            ) from None
        except BaseException:
            await ledger.close()
            raise
        return ledger

    async def _setup(self) -> None:
        db = self._db
        await db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        version = await self._scalar("PRAGMA user_version")
        if version > SCHEMA_VERSION:
            raise LedgerError(
                f"The ledger {self.path} was written by a newer epiconsole (schema {version}); upgrade epiconsole."
            )
        if self.readonly:
            if version < SCHEMA_VERSION:
                raise LedgerError(
                    f"The ledger {self.path} is not ready (schema {version} of {SCHEMA_VERSION}): "
                    "start the lab service once to create or upgrade it."
                )
        else:
            if version == 0 and await self._scalar("SELECT count(*) FROM sqlite_master"):
                # Version 0 with tables in it is some other program's database: never add ours to it.
                raise LedgerError(
                    f"{self.path} is an SQLite file of another program, not an epiconsole ledger; point the "
                    "config's ledger path or --ledger at a new or existing ledger file."
                )
            mode = await self._scalar("PRAGMA journal_mode = WAL")
            if str(mode).lower() != "wal":
                raise LedgerError(
                    f"The ledger {self.path} cannot use WAL mode (got {mode}); put it on a local disk."
                )
            await db.execute("PRAGMA synchronous = NORMAL")
            await db.execute("PRAGMA foreign_keys = ON")
            for target in range(version, SCHEMA_VERSION):
                # One transaction per migration, version bump included.
                await db.executescript(
                    f"BEGIN IMMEDIATE;\n{MIGRATIONS[target]}\nPRAGMA user_version = {target + 1};\nCOMMIT;"
                )
        self._page_size = int(await self._scalar("PRAGMA page_size"))
        if not self.readonly:
            await self._load_tail()
            self._fast = sqlite3.connect(str(self.path), isolation_level=None)
            # Never wait for a lock on the loop thread (busy: the threaded path takes over), and leave
            # checkpoints (fsync) to the threaded connection.
            self._fast.execute("PRAGMA busy_timeout = 0")
            self._fast.execute("PRAGMA synchronous = NORMAL")
            self._fast.execute("PRAGMA wal_autocheckpoint = 0")

    async def close(self) -> None:
        if self._fast is not None:
            self._fast.close()
            self._fast = None
        await self._db.close()

    async def __aenter__(self) -> Ledger:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --------------------------------------------------------------------------------- helpers

    async def _scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        async with self._db.execute(sql, params) as cur:
            row = await cur.fetchone()
        return None if row is None else row[0]

    async def _all(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> list[Any]:
        return list(await self._db.execute_fetchall(sql, params))

    def _check_writable(self) -> None:
        if self.readonly:
            raise RuntimeError("this ledger was opened read-only; only the lab service writes to it")

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """One atomic write transaction; ledger writes by the same task inside it join it.

        Nothing is visible to viewers until the block ends; an exception rolls everything back.
        """
        self._check_writable()
        if self._in_own_transaction():
            yield
            return
        async with self._lock, self._atomic():
            yield

    def _in_own_transaction(self) -> bool:
        return self._tx_task is not None and self._tx_task is asyncio.current_task()

    @asynccontextmanager
    async def _atomic(self) -> AsyncIterator[None]:
        """BEGIN ... COMMIT, or ROLLBACK on any exception; the caller holds the write lock."""
        self._tx_task = asyncio.current_task()
        tail_before = dataclasses.replace(self._tail) if self._tail else None
        next_before = self._next_chunk_id
        try:
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                if self._db.in_transaction:
                    await asyncio.shield(self._db.execute("ROLLBACK"))
                # Sample-tail bookkeeping made inside the failed transaction is void too.
                self._tail, self._next_chunk_id = tail_before, next_before
                raise
            # Shielded: once asked, the commit completes even if the caller is cancelled meanwhile.
            await asyncio.shield(self._db.execute("COMMIT"))
        finally:
            self._tx_task = None

    @asynccontextmanager
    async def _writing(self) -> AsyncIterator[None]:
        """Serialise a single-statement write with transactions (autocommit makes it atomic)."""
        self._check_writable()
        task = asyncio.current_task()
        if self._tx_task is not None and self._tx_task is task:
            yield
            return
        async with self._lock:
            yield

    async def _write(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> int:
        """Run one write statement atomically; returns the last inserted rowid."""
        async with self._writing():
            cur = await self._db.execute(sql, params)
            return int(cur.lastrowid or 0)

    # ------------------------------------------------------------------------------- samples

    def _chunk_cap(self, nch: int) -> int:
        """Ticks per chunk: as many as keep one chunk inside one page (no overflow pages)."""
        # Table leaf cells hold up to page_size - 35 bytes; keep ~64 for the row header and columns.
        return max(1, (self._page_size - 35 - 64) // tick_dtype(nch).itemsize)

    async def _load_tail(self) -> None:
        """Adopt the newest chunk as the open one (to append to) unless it is full."""
        rows = await self._all(
            "SELECT id, t_first, t_last, n, nch FROM sample_chunks ORDER BY id DESC LIMIT 1"
        )
        self._tail = None
        self._next_chunk_id = 1
        if rows:
            last = _Tail(*rows[0])
            self._next_chunk_id = last.chunk_id + 1
            if last.n < self._chunk_cap(last.nch):
                self._tail = last

    @staticmethod
    def _split(
        t: np.ndarray, start: int, cap: int, first_cap: int, bounds_min: float, bounds_max: float
    ) -> list[int]:
        """Greedy chunk boundaries over ``t[start:]``: at most ``cap`` ticks and MAX_CHUNK_SPAN_S each.

        The first piece continues an existing chunk whose times span [bounds_min, bounds_max] and may
        take only ``first_cap`` ticks (pass inf/-inf bounds for a fresh chunk).
        """
        ends: list[int] = []
        a, n = start, t.shape[0]
        room, lo, hi = first_cap, bounds_min, bounds_max
        while a < n:
            b = min(a + room, n)
            seg = t[a:b]
            seg_lo, seg_hi = min(lo, float(seg.min())), max(hi, float(seg.max()))
            if seg_hi - seg_lo > MAX_CHUNK_SPAN_S:
                run_hi = np.maximum.accumulate(np.maximum(seg, hi))
                run_lo = np.minimum.accumulate(np.minimum(seg, lo))
                b = a + int(np.argmax(run_hi - run_lo > MAX_CHUNK_SPAN_S))
            ends.append(b)  # b == a means: close the existing chunk without adding to it
            a, room, lo, hi = b, cap, math.inf, -math.inf
        return ends

    async def insert_samples(self, block: SampleBlock) -> None:
        """Commit ``block`` (atomically). Small blocks append to the open chunk in one statement.

        Inside the caller's own :meth:`transaction` the ticks join it. Otherwise the write lock is
        taken first, so no other task's transaction is open while the ticks are stored. A block of
        at most ``FAST_MAX_TICKS`` ticks is then committed on the event loop thread through the
        second connection (a deliberate trade: a thread hop costs more than the commit). That
        commit never waits: the connection has ``busy_timeout=0`` and no WAL checkpoints of its
        own (no fsync), and if the file is busy anyway (a write of ours still finishing in the
        worker thread after a cancellation) it fails at once and the block goes the threaded way.
        """
        self._check_writable()
        if block.n == 0:
            return
        nch = block.channels
        size = tick_dtype(nch).itemsize
        raw = block.pack_bytes()
        t = block.t
        if self._in_own_transaction():
            await self._store(self._plan(t, nch), t, raw, size, nch, own_tx=False)
            return
        async with self._lock:
            plan = self._plan(t, nch)
            statements = sum(1 for step in plan if step[0] != "close")
            if block.n <= FAST_MAX_TICKS and statements <= 2 and self._fast is not None:
                # The service's commit every 250 ms, on the loop thread: two thread hops per commit
                # cost more than the commit itself (far more on a busy machine), while this is
                # ~0.1 ms of work that never waits for a lock (busy -> the threaded path below).
                try:
                    self._tail, self._next_chunk_id = self._store_sync(
                        plan, t, raw, size, nch, own_tx=statements > 1, conn=self._fast
                    )
                except sqlite3.OperationalError as exc:
                    if exc.sqlite_errorcode not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                        raise
                else:
                    self._fast_commits += 1
                    if self._fast_commits % FAST_CHECKPOINT_EVERY == 0:
                        await self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    return
            try:
                # One statement (the common small batch) is atomic by itself in autocommit mode.
                await self._store(plan, t, raw, size, nch, own_tx=statements > 1)
            except BaseException:
                # Cancelled or failed mid-way: the worker thread may still have committed, so re-read
                # the open chunk's state from the file rather than guess.
                await asyncio.shield(self._load_tail())
                raise

    async def _store(
        self, plan: list[tuple[str, int, int]], t: np.ndarray, raw: bytes, size: int, nch: int, own_tx: bool
    ) -> None:
        """Run ``plan`` in aiosqlite's worker thread in one hop, then adopt the new open-chunk state.

        One hop instead of one per statement: at the meter's top rate the service commits four
        times a second, and thread hops would otherwise dominate the cost of a commit.
        """
        run = self._db._execute  # noqa: SLF001 - aiosqlite's own "run this in the connection's thread"
        tail, next_id = await run(self._store_sync, plan, t, raw, size, nch, own_tx)
        self._tail, self._next_chunk_id = tail, next_id

    def _store_sync(
        self,
        plan: list[tuple[str, int, int]],
        t: np.ndarray,
        raw: bytes,
        size: int,
        nch: int,
        own_tx: bool,
        conn: sqlite3.Connection | None = None,
    ) -> tuple[_Tail | None, int]:
        """The statements of ``plan``; returns (open chunk, next chunk id).

        Runs on ``conn``'s own thread: aiosqlite's worker for its connection (the default), the loop
        thread for the fast connection.
        """
        if conn is None:
            conn = self._db._conn  # noqa: SLF001 - only ever touched from its own thread, here
        tail = self._tail
        next_id = self._next_chunk_id
        if own_tx:
            conn.execute("BEGIN IMMEDIATE")
        try:
            for kind, a, b in plan:
                if kind == "close":
                    tail = None
                    continue
                seg = t[a:b]
                lo, hi = float(seg.min()), float(seg.max())
                data = raw[a * size : b * size]
                if kind == "append":
                    assert tail is not None
                    # || yields text; the cast takes its bytes back unchanged as a blob.
                    conn.execute(
                        "UPDATE sample_chunks SET data = CAST(data || ? AS BLOB), n = n + ?, "
                        "t_first = min(t_first, ?), t_last = max(t_last, ?) WHERE id = ?",
                        (data, b - a, lo, hi, tail.chunk_id),
                    )
                    tail = _Tail(
                        tail.chunk_id, min(tail.t_first, lo), max(tail.t_last, hi), tail.n + b - a, nch
                    )
                else:  # a full chunk, or a new open one
                    conn.execute(
                        "INSERT INTO sample_chunks (id, t_first, t_last, n, nch, data) VALUES (?, ?, ?, ?, ?, ?)",
                        (next_id, lo, hi, b - a, nch, data),
                    )
                    tail = _Tail(next_id, lo, hi, b - a, nch) if kind == "open" else None
                    next_id += 1
            if own_tx:
                conn.execute("COMMIT")
        except BaseException:
            if own_tx and conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return tail, next_id

    def _plan(self, t: np.ndarray, nch: int) -> list[tuple[str, int, int]]:
        """Steps to store ticks ``t`` as (kind, a, b) over tick indices [a, b).

        ``append`` extends the open chunk, ``close`` stops appending to it (no SQL), ``chunk``
        inserts a full chunk, ``open`` inserts a new open chunk.
        """
        cap = self._chunk_cap(nch)
        tail = self._tail
        n = t.shape[0]
        if tail is not None and tail.nch == nch and tail.n + n < cap:
            # The common case, decided without numpy calls: a small batch that fits the open chunk.
            times = t.tolist()
            if max(tail.t_last, *times) - min(tail.t_first, *times) <= MAX_CHUNK_SPAN_S:
                return [("append", 0, n)]
        if tail is not None and tail.nch == nch:
            ends = self._split(t, 0, cap, cap - tail.n, tail.t_first, tail.t_last)
        else:
            ends = self._split(t, 0, cap, cap, math.inf, -math.inf)
            if tail is not None:
                ends.insert(0, 0)  # close the open chunk of another channel count first
        plan: list[tuple[str, int, int]] = []
        a = 0
        for i, b in enumerate(ends):
            if i == 0 and tail is not None:
                if b > a:
                    plan.append(("append", a, b))
                if tail.n + (b - a) >= cap or len(ends) > 1:
                    plan.append(("close", 0, 0))
            elif b - a >= cap or i < len(ends) - 1:
                plan.append(("chunk", a, b))
            else:
                plan.append(("open", a, b))
            a = b
        return plan

    @staticmethod
    def _decode(
        rows: Iterable[Sequence[Any]],
        fields: Iterable[str] | None = None,
        window: tuple[float, float] | None = None,
    ) -> SampleBlock:
        """Rows of (id, n, nch, data) -> one block, grouping runs of equal channel count.

        With ``window``, only ticks inside it are decoded.
        """
        fields = None if fields is None else tuple(fields)
        groups: list[SampleBlock] = []
        runs: list[tuple[int, list[bytes]]] = []
        for row in rows:
            if not runs or runs[-1][0] != row[2]:
                runs.append((row[2], []))
            runs[-1][1].append(row[3])
        for nch, blobs in runs:
            rec = np.frombuffer(b"".join(blobs), dtype=tick_dtype(nch))
            if window is not None:
                t = rec["t"]
                if rec.size > 1 and bool(np.all(t[1:] >= t[:-1])):
                    rec = rec[np.searchsorted(t, window[0], "left") : np.searchsorted(t, window[1], "right")]
                else:
                    rec = rec[(t >= window[0]) & (t <= window[1])]
            groups.append(SampleBlock.unpack(rec, fields))
        return SampleBlock.concat(groups)

    async def read_samples(self, t0: float, t1: float, fields: Iterable[str] | None = None) -> SampleBlock:
        """All ticks with ``t0 <= t <= t1``, in time order (an empty block when there are none).

        ``fields`` names the channel quantities to decode (default all); the others come back as
        all-NaN arrays. Energy needs only ``("W", "Wh")``, which makes long reads much cheaper. For
        energy over a window, read a margin of at least the gap limit on both sides so the window's
        ends are covered (see :func:`epiconsole.epi.window_energy`).
        """
        rows = await self._all(
            # Index order: ORDER BY id would sort every blob in a temporary b-tree (4x slower).
            "SELECT id, n, nch, data FROM sample_chunks WHERE t_first BETWEEN :lo AND :t1 AND t_last >= :t0 "
            "ORDER BY t_first, id",
            {"lo": t0 - MAX_CHUNK_SPAN_S, "t0": t0, "t1": t1},
        )
        return self._decode(rows, fields, (t0, t1)).sorted_by_time()

    async def samples_after(
        self, cursor: SampleCursor | None = None, *, max_chunks: int = 1000
    ) -> tuple[SampleBlock, SampleCursor]:
        """Ticks committed after ``cursor`` (in commit order) and the cursor to pass next time.

        Start with ``SampleCursor()`` for everything or :meth:`sample_cursor_at_end` for new ticks only.
        At most ``max_chunks`` chunks (32 ticks each at 4 channels) come back per call.
        """
        cursor = cursor or SampleCursor()
        rows = await self._all(
            "SELECT id, n, nch, data FROM sample_chunks WHERE id >= ? ORDER BY id LIMIT ?",
            (cursor.chunk, max_chunks),
        )
        if not rows:
            return SampleBlock.empty(), cursor
        block = self._decode(rows)
        if rows[0][0] == cursor.chunk and cursor.n:
            block = block.take(slice(min(cursor.n, rows[0][1]), None))
        return block, SampleCursor(rows[-1][0], rows[-1][1])

    async def sample_cursor_at_end(self) -> SampleCursor:
        """A cursor past every tick committed so far (for viewers that want only new ticks)."""
        rows = await self._all("SELECT id, n FROM sample_chunks ORDER BY id DESC LIMIT 1")
        return SampleCursor(rows[0][0], rows[0][1]) if rows else SampleCursor()

    async def sample_span(self) -> tuple[float, float] | None:
        """(earliest, latest) tick time stored, or None without samples."""
        row = (
            await self._all(
                "SELECT (SELECT min(t_first) FROM sample_chunks), (SELECT max(t_last) FROM sample_chunks "
                "WHERE t_first >= (SELECT max(t_first) FROM sample_chunks) - ?)",
                (MAX_CHUNK_SPAN_S,),
            )
        )[0]
        return None if row[0] is None else (float(row[0]), float(row[1]))

    async def sample_count(self) -> int:
        """Number of stored ticks."""
        return int(await self._scalar("SELECT coalesce(sum(n), 0) FROM sample_chunks"))

    async def prune_samples(self, before_t: float, keep_ranges: Iterable[tuple[float, float]] = ()) -> int:
        """Delete chunks (except the newest) that end before ``before_t``; returns the number of ticks deleted.

        Chunks touching a ``keep_ranges`` interval or any trial's measurement window (from the
        begin/end markers; an open window counts up to now), widened by ``PRUNE_MARGIN_S`` on both
        sides, are kept whole: samples inside trial windows are never pruned, nor the ones just
        outside that cover the window's ends (energy and the export's trace need them).
        """
        self._check_writable()
        # The candidates are read outside the write lock (the scan can be long; commits go on
        # meanwhile). New chunks are newer, so the list stays right. The newest chunk always stays
        # (it is the open one, or full): chunk ids must never be reused after a reopen, or a
        # viewer's cursor would skip the new ticks. t_first <= t_last lets the t_first index bound the
        # scan (a table scan would read every sample page; the planner picks it for the id bound).
        rows = await self._all(
            "SELECT id, t_first, t_last, n FROM sample_chunks INDEXED BY sample_chunks_t WHERE t_first < :b AND t_last < :b "
            "AND id < (SELECT max(id) FROM sample_chunks)",
            {"b": before_t},
        )
        if not rows:
            return 0
        arr = np.array(rows, dtype=np.float64)
        # The windows are read under the lock, so a window marked meanwhile is kept too.
        async with self.transaction():
            keep = [(float(a), float(b)) for a, b in keep_ranges]
            keep += await self._marker_windows()
            drop = np.ones(len(rows), dtype=bool)
            for a, b in keep:
                drop &= ~((arr[:, 1] <= b + PRUNE_MARGIN_S) & (arr[:, 2] >= a - PRUNE_MARGIN_S))
            ids = arr[drop, 0].astype(np.int64).tolist()
            await self._db.executemany("DELETE FROM sample_chunks WHERE id = ?", [(i,) for i in ids])
        return int(arr[drop, 3].sum())

    async def _marker_windows(self) -> list[tuple[float, float]]:
        rows = await self._all("SELECT trial_id, kind, t FROM markers ORDER BY trial_id, id")
        windows: list[tuple[float, float]] = []
        begin: dict[int, float] = {}
        for trial_id, kind, t in rows:
            if kind == "begin":
                if trial_id in begin:
                    windows.append((begin[trial_id], t))
                begin[trial_id] = t
            elif trial_id in begin:
                windows.append((begin.pop(trial_id), t))
        windows += [(t, math.inf) for t in begin.values()]
        return windows

    # ---------------------------------------------------------------------------------- gaps

    async def insert_gap(
        self,
        t0: float,
        t1: float,
        cause: str,
        channel: int | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> int:
        """Record a stretch without (valid) samples; ``channel=None`` means all channels."""
        if not cause:
            raise ValueError("a gap needs a cause")
        if t1 < t0:
            raise ValueError(f"gap ends before it starts ({t0} > {t1})")
        return await self._write(
            "INSERT INTO gaps (t0, t1, cause, channel, data) VALUES (?, ?, ?, ?, ?)",
            (t0, t1, cause, channel, None if data is None else _dumps(data)),
        )

    async def gaps(self, t0: float = -math.inf, t1: float = math.inf) -> list[Gap]:
        """Gaps overlapping [t0, t1], oldest first."""
        rows = await self._all(
            "SELECT id, t0, t1, cause, channel, data FROM gaps WHERE t0 <= ? AND t1 >= ? ORDER BY t0, id",
            (t1, t0),
        )
        return [Gap(r[0], r[1], r[2], r[3], r[4], _loads(r[5])) for r in rows]

    # ----------------------------------------------------------------------------- campaigns

    async def create_campaign(
        self,
        plan_name: str,
        plan: Mapping[str, Any],
        config_digest: str,
        simulated: bool,
        provenance: Mapping[str, Any],
    ) -> int:
        return await self._write(
            "INSERT INTO campaigns (plan_name, plan, config_digest, simulated, provenance, started_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (plan_name, _dumps(plan), config_digest, int(bool(simulated)), _dumps(provenance), time.time()),
        )

    async def finish_campaign(self, campaign_id: int, exit_status: str) -> None:
        await self._write(
            "UPDATE campaigns SET finished_at = ?, exit_status = ? WHERE id = ?",
            (time.time(), exit_status, campaign_id),
        )

    _CAMPAIGN_COLS = (
        "id, plan_name, plan, config_digest, simulated, provenance, started_at, finished_at, exit_status"
    )

    @staticmethod
    def _campaign(r: Sequence[Any]) -> Campaign:
        return Campaign(r[0], r[1], json.loads(r[2]), r[3], bool(r[4]), json.loads(r[5]), r[6], r[7], r[8])

    async def campaign(self, campaign_id: int) -> Campaign | None:
        rows = await self._all(f"SELECT {self._CAMPAIGN_COLS} FROM campaigns WHERE id = ?", (campaign_id,))
        return self._campaign(rows[0]) if rows else None

    async def latest_campaign(self) -> Campaign | None:
        rows = await self._all(f"SELECT {self._CAMPAIGN_COLS} FROM campaigns ORDER BY id DESC LIMIT 1")
        return self._campaign(rows[0]) if rows else None

    # -------------------------------------------------------------------------------- trials

    async def ensure_trials(self, campaign_id: int, rows: Iterable[Mapping[str, Any]]) -> list[Trial]:
        """Create the campaign's trials (idempotent: existing ones are left as they are).

        Each row needs ``config_id`` and ``rep``; optional ``ord`` (run order of the configuration,
        default: order of first appearance), ``experts``, ``target`` and ``data`` (a dict describing
        the configuration). Returns all the campaign's trials.
        """
        rows = list(rows)
        now = time.time()
        configs: dict[str, tuple[Any, ...]] = {}
        trials = []
        for row in rows:
            cid = str(row["config_id"])
            if cid not in configs:
                configs[cid] = (
                    campaign_id,
                    cid,
                    int(row.get("ord", len(configs))),
                    row.get("experts"),
                    row.get("target"),
                    _dumps(row.get("data") or {}),
                )
            trials.append((campaign_id, cid, int(row["rep"]), now))
        async with self.transaction():
            await self._db.executemany(
                "INSERT OR IGNORE INTO configurations (campaign_id, config_id, ord, experts, target, data) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                list(configs.values()),
            )
            await self._db.executemany(
                "INSERT OR IGNORE INTO trials (campaign_id, config_id, rep, updated_at) VALUES (?, ?, ?, ?)",
                trials,
            )
        return await self.trials(campaign_id)

    _TRIAL_SQL = (
        "SELECT t.id, t.campaign_id, t.config_id, t.rep, c.ord, c.experts, c.target, t.status, t.valid, "
        "t.reasons, t.updated_at, c.data FROM trials t JOIN configurations c "
        "ON c.campaign_id = t.campaign_id AND c.config_id = t.config_id"
    )

    @staticmethod
    def _trial(r: Sequence[Any]) -> Trial:
        return Trial(
            id=r[0],
            campaign_id=r[1],
            config_id=r[2],
            rep=r[3],
            ord=r[4],
            experts=r[5],
            target=r[6],
            status=r[7],
            valid=None if r[8] is None else bool(r[8]),
            reasons=tuple(json.loads(r[9])),
            updated_at=r[10],
            config=json.loads(r[11]),
        )

    async def trials(self, campaign_id: int) -> list[Trial]:
        """The campaign's trials in run order (configuration order, then repetition)."""
        rows = await self._all(
            f"{self._TRIAL_SQL} WHERE t.campaign_id = ? ORDER BY c.ord, t.rep", (campaign_id,)
        )
        return [self._trial(r) for r in rows]

    async def trial(self, trial_id: int) -> Trial | None:
        rows = await self._all(f"{self._TRIAL_SQL} WHERE t.id = ?", (trial_id,))
        return self._trial(rows[0]) if rows else None

    async def set_trial(
        self,
        trial_id: int,
        *,
        status: str | None = None,
        valid: bool | None = _UNSET,
        reasons: Iterable[str] | None = None,
    ) -> None:
        """Update a trial's status, validity (``None`` = not judged) and/or reasons; others unchanged."""
        sets, params = ["updated_at = ?"], [time.time()]
        if status is not None:
            sets.append("status = ?")
            params.append(status)
        if valid is not _UNSET:
            sets.append("valid = ?")
            params.append(None if valid is None else int(bool(valid)))
        if reasons is not None:
            sets.append("reasons = ?")
            params.append(_dumps(list(reasons)))
        await self._write(f"UPDATE trials SET {', '.join(sets)} WHERE id = ?", (*params, trial_id))

    # --------------------------------------------------------------------------- checkpoints

    async def checkpoint(
        self, trial_id: int, stage: str, status: str, data: Mapping[str, Any] | None = None
    ) -> int:
        """Append a stage status (``started``, ``done``, ``failed``, ``discarded``) to the trial's history."""
        if status not in CHECKPOINT_STATUSES:
            raise ValueError(f"checkpoint status must be one of {CHECKPOINT_STATUSES}, not {status!r}")
        return await self._write(
            "INSERT INTO checkpoints (trial_id, stage, status, data, t) VALUES (?, ?, ?, ?, ?)",
            (trial_id, stage, status, None if data is None else _dumps(data), time.time()),
        )

    async def checkpoints(self, trial_id: int) -> list[Checkpoint]:
        """The trial's checkpoint history, oldest first."""
        rows = await self._all(
            "SELECT id, trial_id, stage, status, data, t FROM checkpoints WHERE trial_id = ? ORDER BY id",
            (trial_id,),
        )
        return [Checkpoint(r[0], r[1], r[2], r[3], _loads(r[4]), r[5]) for r in rows]

    async def stage_status(self, trial_id: int) -> dict[str, Checkpoint]:
        """The latest checkpoint of each stage of the trial."""
        return {c.stage: c for c in await self.checkpoints(trial_id)}

    async def first_unfinished_stage(self, trial_id: int, stages: Sequence[str]) -> str | None:
        """The first of ``stages`` whose latest status is not ``done`` (where a resume starts), or None."""
        latest = await self.stage_status(trial_id)
        for stage in stages:
            c = latest.get(stage)
            if c is None or c.status != "done":
                return stage
        return None

    # ------------------------------------------------------------------------------- markers

    async def mark(self, trial_id: int, kind: str, t: float | None = None) -> int:
        """Record a measurement window marker (``begin`` or ``end``) at host time ``t`` (default now)."""
        if kind not in ("begin", "end"):
            raise ValueError(f"marker kind must be 'begin' or 'end', not {kind!r}")
        return await self._write(
            "INSERT INTO markers (trial_id, kind, t) VALUES (?, ?, ?)",
            (trial_id, kind, time.time() if t is None else t),
        )

    async def markers(self, trial_id: int) -> list[Marker]:
        rows = await self._all(
            "SELECT id, trial_id, kind, t FROM markers WHERE trial_id = ? ORDER BY id", (trial_id,)
        )
        return [Marker(*r) for r in rows]

    async def window(self, trial_id: int) -> tuple[float, float] | None:
        """The trial's latest complete measurement window (last begin and the end after it), or None."""
        begin: float | None = None
        window: tuple[float, float] | None = None
        for m in await self.markers(trial_id):
            if m.kind == "begin":
                begin = m.t
            elif begin is not None:
                window, begin = (begin, m.t), None
        return window

    # ------------------------------------------------------------------------------- results

    async def _put_result(
        self, table: str, trial_id: int, result: Mapping[str, Any], stage_done: str | None
    ) -> None:
        async with self.transaction():
            await self._db.execute(
                f"INSERT INTO {table} (trial_id, result, t) VALUES (?, ?, ?) "
                "ON CONFLICT (trial_id) DO UPDATE SET result = excluded.result, t = excluded.t",
                (trial_id, _dumps(result), time.time()),
            )
            if stage_done:
                await self.checkpoint(trial_id, stage_done, "done")

    async def put_benchmark(
        self, trial_id: int, result: Mapping[str, Any], *, stage_done: str | None = "benchmark"
    ) -> None:
        """Store (or replace) the trial's benchmark result and mark ``stage_done`` done, atomically."""
        await self._put_result("benchmark_results", trial_id, result, stage_done)

    async def put_epi(
        self, trial_id: int, result: Mapping[str, Any], *, stage_done: str | None = "calculate"
    ) -> None:
        """Store (or replace) the trial's EPI result and mark ``stage_done`` done, atomically."""
        await self._put_result("epi_results", trial_id, result, stage_done)

    async def results(self, campaign_id: int) -> list[TrialResult]:
        """Every trial of the campaign with its benchmark and EPI results (None where missing)."""
        rows = await self._all(
            f"SELECT x.*, b.result, e.result FROM ({self._TRIAL_SQL} WHERE t.campaign_id = ?) x "
            "LEFT JOIN benchmark_results b ON b.trial_id = x.id LEFT JOIN epi_results e ON e.trial_id = x.id "
            "ORDER BY x.ord, x.rep",
            (campaign_id,),
        )
        return [TrialResult(self._trial(r[:12]), _loads(r[12]), _loads(r[13])) for r in rows]

    # -------------------------------------------------------------------------------- events

    async def event(
        self,
        kind: str,
        message: str,
        level: str = "info",
        data: Mapping[str, Any] | None = None,
        trial_id: int | None = None,
    ) -> int:
        """Append to the log viewers show; returns the event id."""
        if level not in EVENT_LEVELS:
            raise ValueError(f"event level must be one of {EVENT_LEVELS}, not {level!r}")
        return await self._write(
            "INSERT INTO events (t, kind, level, message, data, trial_id) VALUES (?, ?, ?, ?, ?, ?)",
            (time.time(), kind, level, message, None if data is None else _dumps(data), trial_id),
        )

    async def events_after(self, after_id: int = 0, limit: int = 500) -> list[Event]:
        """Events with id > ``after_id``, oldest first, at most ``limit``."""
        rows = await self._all(
            "SELECT id, t, kind, level, message, data, trial_id FROM events WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, limit),
        )
        return [Event(r[0], r[1], r[2], r[3], r[4], _loads(r[5]), r[6]) for r in rows]

    async def last_events(self, limit: int = 100) -> list[Event]:
        """The newest ``limit`` events, oldest first (where a viewer starts)."""
        rows = await self._all(
            "SELECT * FROM (SELECT id, t, kind, level, message, data, trial_id FROM events ORDER BY id DESC LIMIT ?) "
            "ORDER BY id",
            (limit,),
        )
        return [Event(r[0], r[1], r[2], r[3], r[4], _loads(r[5]), r[6]) for r in rows]

    # ------------------------------------------------------------------------------ commands

    async def put_command(self, verb: str, args: Mapping[str, Any] | None = None) -> int:
        """Queue a command for the lab service; works on read-only (viewer) ledgers too."""
        sql = "INSERT INTO commands (t, verb, args) VALUES (?, ?, ?)"
        params = (time.time(), verb, _dumps(args or {}))
        if not self.readonly:
            return await self._write(sql, params)
        # A viewer's only write: its own short-lived connection, so the viewer stays read-only otherwise.
        async with aiosqlite.connect(str(self.path), isolation_level=None) as db:
            await db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            cur = await db.execute(sql, params)
            return int(cur.lastrowid or 0)

    _COMMAND_COLS = "id, t, verb, args, status, result, t_done"

    @staticmethod
    def _command(r: Sequence[Any]) -> Command:
        return Command(r[0], r[1], r[2], json.loads(r[3]), r[4], _loads(r[5]), r[6])

    async def pending_commands(self) -> list[Command]:
        rows = await self._all(
            f"SELECT {self._COMMAND_COLS} FROM commands WHERE status = 'pending' ORDER BY id"
        )
        return [self._command(r) for r in rows]

    async def complete_command(self, command_id: int, ok: bool, result: Any = None) -> None:
        await self._write(
            "UPDATE commands SET status = ?, result = ?, t_done = ? WHERE id = ?",
            ("done" if ok else "failed", _dumps(result), time.time(), command_id),
        )

    async def command(self, command_id: int) -> Command | None:
        rows = await self._all(f"SELECT {self._COMMAND_COLS} FROM commands WHERE id = ?", (command_id,))
        return self._command(rows[0]) if rows else None

    async def wait_command(self, command_id: int, timeout_s: float, poll_s: float = 0.1) -> Command | None:
        """Poll until the command is completed; None if it is still pending after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            cmd = await self.command(command_id)
            if cmd is None or cmd.status != "pending" or time.monotonic() >= deadline:
                return cmd if cmd is None or cmd.status != "pending" else None
            await asyncio.sleep(poll_s)

    # ---------------------------------------------------------------------------- provenance

    async def put_provenance(self, scope: str, scope_id: str | int, data: Mapping[str, Any]) -> None:
        """Store (or replace) what produced ``scope``/``scope_id`` (software versions, hosts, files)."""
        await self._write(
            "INSERT INTO provenance (scope, scope_id, data, t) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (scope, scope_id) DO UPDATE SET data = excluded.data, t = excluded.t",
            (scope, str(scope_id), _dumps(data), time.time()),
        )

    async def provenance(self, scope: str, scope_id: str | int) -> dict[str, Any] | None:
        text = await self._scalar(
            "SELECT data FROM provenance WHERE scope = ? AND scope_id = ?", (scope, str(scope_id))
        )
        return _loads(text)

    # ---------------------------------------------------------------------------------- live

    async def set_live(self, key: str, value: Mapping[str, Any]) -> None:
        """Publish a small live-state blob for viewers (replaces the previous one under ``key``)."""
        await self._write(
            "INSERT INTO live (key, value, t) VALUES (?, ?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value, t = excluded.t",
            (key, _dumps(value), time.time()),
        )

    async def get_live(self) -> dict[str, LiveEntry]:
        """Every live blob with the time it was last set."""
        rows = await self._all("SELECT key, value, t FROM live")
        return {r[0]: LiveEntry(json.loads(r[1]), r[2]) for r in rows}

    # ---------------------------------------------------------------------------------- misc

    async def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check`` verdict (``ok`` when healthy)."""
        rows = await self._all("PRAGMA integrity_check")
        return "; ".join(str(r[0]) for r in rows)
