"""Plain values the ledger hands out (frozen dataclasses; JSON payloads already decoded)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Stage checkpoint statuses. A stage counts as finished only when its latest status is ``done``.
CHECKPOINT_STATUSES = ("started", "done", "failed", "discarded")
#: Causes of recorded meter gaps (others are accepted; these are the ones the driver reports).
GAP_CAUSES = ("seq_jump", "reboot", "unplug", "silent")
EVENT_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class Campaign:
    id: int
    plan_name: str
    plan: dict[str, Any]
    config_digest: str
    simulated: bool
    provenance: dict[str, Any]
    started_at: float
    finished_at: float | None
    exit_status: str | None


@dataclass(frozen=True)
class Trial:
    """One repetition of one configuration in a campaign."""

    id: int
    campaign_id: int
    config_id: str
    rep: int
    ord: int
    experts: int | None
    target: str | None
    status: str
    valid: bool | None
    reasons: tuple[str, ...]
    updated_at: float
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Checkpoint:
    id: int
    trial_id: int
    stage: str
    status: str
    data: dict[str, Any] | None
    t: float


@dataclass(frozen=True)
class Marker:
    id: int
    trial_id: int
    kind: str
    t: float


@dataclass(frozen=True)
class Gap:
    id: int
    t0: float
    t1: float
    cause: str
    channel: int | None
    data: dict[str, Any] | None


@dataclass(frozen=True)
class Event:
    id: int
    t: float
    kind: str
    level: str
    message: str
    data: dict[str, Any] | None
    trial_id: int | None


@dataclass(frozen=True)
class Command:
    id: int
    t: float
    verb: str
    args: dict[str, Any]
    status: str
    result: Any
    t_done: float | None

    @property
    def ok(self) -> bool | None:
        """True/False once completed, None while pending."""
        return None if self.status == "pending" else self.status == "done"


@dataclass(frozen=True)
class LiveEntry:
    value: dict[str, Any]
    t: float


@dataclass(frozen=True)
class TrialResult:
    trial: Trial
    benchmark: dict[str, Any] | None
    epi: dict[str, Any] | None


@dataclass(frozen=True, order=True)
class SampleCursor:
    """Where a viewer's incremental sample reading stands: ``n`` ticks of chunk ``chunk`` seen."""

    chunk: int = 0
    n: int = 0
