"""Where the console's data comes from: a small async protocol over the ledger and the live state.

Controllers depend on :class:`DataSource`, never on SQL or hardware. :class:`LedgerSource` is the real
one (the lab service's ledger, opened read-only, the way every viewer reads it); tests and snapshots use
the same class on a ledger file a seeded script wrote, so nothing on screen comes from a fake.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from epiconsole.live import LiveSnapshot

if TYPE_CHECKING:  # the ledger (numpy, aiosqlite) loads after the first frame, when the source opens
    from epiconsole.ledger import (
        Campaign,
        Checkpoint,
        Command,
        Event,
        Ledger,
        Marker,
        SampleBlock,
        TrialResult,
    )

#: Seconds of power trace around a repetition's window in the detail view.
TRACE_MARGIN_S = 5.0


class DataSource(Protocol):
    """What a viewer may read and the one thing it may write (commands for the service)."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def live(self) -> LiveSnapshot: ...

    async def campaign(self) -> Campaign | None: ...

    async def results(self, campaign_id: int) -> list[TrialResult]: ...

    async def checkpoints(self, trial_id: int) -> list[Checkpoint]: ...

    async def markers(self, trial_id: int) -> list[Marker]: ...

    async def samples(self, t0: float, t1: float) -> SampleBlock: ...

    async def provenance(self, scope: str, scope_id: str | int) -> dict[str, Any] | None: ...

    async def events_after(self, after_id: int, limit: int = 500) -> list[Event]: ...

    async def last_events(self, limit: int = 200) -> list[Event]: ...

    async def send(self, verb: str, args: Mapping[str, Any] | None = None) -> int: ...

    async def wait_command(self, command_id: int, timeout_s: float) -> Command | None: ...


class LedgerSource:
    """A :class:`DataSource` reading the lab service's ledger file read-only."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._ledger: Ledger | None = None

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            raise RuntimeError("LedgerSource.open() was not awaited")
        return self._ledger

    async def open(self) -> None:
        if self._ledger is None:
            from epiconsole.ledger import Ledger

            self._ledger = await Ledger.open(self.path, readonly=True)

    async def close(self) -> None:
        if self._ledger is not None:
            await self._ledger.close()
            self._ledger = None

    async def live(self) -> LiveSnapshot:
        entries = await self.ledger.get_live()
        return LiveSnapshot.from_live({k: e.value for k, e in entries.items()})

    async def campaign(self) -> Campaign | None:
        return await self.ledger.latest_campaign()

    async def results(self, campaign_id: int) -> list[TrialResult]:
        return await self.ledger.results(campaign_id)

    async def checkpoints(self, trial_id: int) -> list[Checkpoint]:
        return await self.ledger.checkpoints(trial_id)

    async def markers(self, trial_id: int) -> list[Marker]:
        return await self.ledger.markers(trial_id)

    async def samples(self, t0: float, t1: float) -> SampleBlock:
        return await self.ledger.read_samples(t0, t1)

    async def provenance(self, scope: str, scope_id: str | int) -> dict[str, Any] | None:
        return await self.ledger.provenance(scope, scope_id)

    async def events_after(self, after_id: int, limit: int = 500) -> list[Event]:
        return await self.ledger.events_after(after_id, limit)

    async def last_events(self, limit: int = 200) -> list[Event]:
        return await self.ledger.last_events(limit)

    async def send(self, verb: str, args: Mapping[str, Any] | None = None) -> int:
        return await self.ledger.put_command(verb, args)

    async def wait_command(self, command_id: int, timeout_s: float) -> Command | None:
        return await self.ledger.wait_command(command_id, timeout_s)


@dataclass(frozen=True)
class LabState:
    """One consistent read of everything the screens show, taken by :func:`read_state`."""

    live: LiveSnapshot = field(default_factory=LiveSnapshot)
    campaign: Campaign | None = None
    results: tuple[TrialResult, ...] = ()
    #: Host time the read finished (from the app's clock; frozen in snapshot tests).
    read_at: float = 0.0


async def read_state(
    source: DataSource, previous: LabState | None = None, *, with_results: bool = True,
    clock: Callable[[], float] = time.time,
) -> LabState:
    """Read the live state and, when asked, the campaign's trials and results.

    The results table changes at stage boundaries only, so callers read it at a lower rate than the
    live state and pass the previous state to keep its results.
    """
    live = await source.live()
    if with_results or previous is None:
        campaign = await source.campaign()
        results = tuple(await source.results(campaign.id)) if campaign else ()
    else:
        campaign, results = previous.campaign, previous.results
    return LabState(live=live, campaign=campaign, results=results, read_at=clock())
