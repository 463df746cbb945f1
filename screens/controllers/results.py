"""Per-configuration summaries of a campaign's results (median and spread over repetitions).

Reads the EPI result the engine stores per trial (the paper's ``epi_NNN.json`` schema:
``energy.joules_per_token``, ``accuracy.composite``, ``epi.value``) and falls back to the benchmark
result for accuracy. Only valid repetitions enter the medians; invalid ones are counted, never mixed in.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from epiconsole.ledger import TrialResult


DONE_STATUSES = frozenset({"done", "finished", "complete", "completed", "valid", "invalid"})
FAILED_STATUSES = frozenset({"failed", "error", "aborted"})
SKIPPED_STATUSES = frozenset({"skipped"})
RUNNING_STATUSES = frozenset({"running", "active", "started", "in_progress"})


def _get(d: Mapping[str, Any] | None, *path: str) -> Any:
    cur: Any = d
    for key in path:
        if not isinstance(cur, Mapping) or key not in cur:
            return None
        cur = cur[key]
    return cur


def _float(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def jpt_of(r: TrialResult) -> float | None:
    return _float(_get(r.epi, "energy", "joules_per_token")) or _float(_get(r.epi, "epi", "joules_per_token"))


def accuracy_of(r: TrialResult) -> float | None:
    for value in (
        _get(r.epi, "accuracy", "composite"),
        _get(r.epi, "epi", "accuracy_composite"),
        _get(r.benchmark, "accuracy", "composite"),
        _get(r.benchmark, "composite"),
    ):
        if _float(value) is not None:
            return _float(value)
    return None


def epi_of(r: TrialResult) -> float | None:
    return _float(_get(r.epi, "epi", "value"))


def task_accuracies(r: TrialResult) -> dict[str, float]:
    """Per-task accuracy of one repetition (``accuracy`` minus ``composite``)."""
    acc = _get(r.epi, "accuracy") or _get(r.benchmark, "accuracy") or {}
    out: dict[str, float] = {}
    if isinstance(acc, Mapping):
        for k, v in acc.items():
            if k != "composite" and _float(v) is not None:
                out[k] = float(v)
    return out


@dataclass(frozen=True)
class Spread:
    """Median and range over the valid repetitions (``n`` of them)."""

    median: float | None = None
    lo: float | None = None
    hi: float | None = None
    n: int = 0

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Spread:
        vals = [v for v in values if v is not None]
        if not vals:
            return cls()
        return cls(statistics.median(vals), min(vals), max(vals), len(vals))


@dataclass(frozen=True)
class ConfigSummary:
    config_id: str
    order: int
    experts: int
    target: str | None
    reps: int
    done: int
    valid: int
    invalid: int
    jpt: Spread
    accuracy: Spread
    epi: Spread


def summarize(results: Iterable[TrialResult]) -> list[ConfigSummary]:
    """One summary per configuration, in run order."""
    by_config: dict[str, list[TrialResult]] = {}
    for r in results:
        by_config.setdefault(r.trial.config_id, []).append(r)
    out = []
    for cid, rs in by_config.items():
        t = rs[0].trial
        done = [r for r in rs if r.trial.status in DONE_STATUSES or r.epi is not None]
        valid = [r for r in done if r.trial.valid is True]
        out.append(
            ConfigSummary(
                config_id=cid,
                order=t.ord,
                experts=int(t.experts or 0),
                target=t.target,
                reps=len(rs),
                done=len(done),
                valid=len(valid),
                invalid=sum(1 for r in done if r.trial.valid is False),
                jpt=Spread.of(jpt_of(r) for r in valid),
                accuracy=Spread.of(accuracy_of(r) for r in valid),
                epi=Spread.of(epi_of(r) for r in valid),
            )
        )
    out.sort(key=lambda s: s.order)
    return out
