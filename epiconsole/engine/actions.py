"""The interface between the engine's state machine and the lab: one async method per stage.

The engine decides *when* (order, checkpoints, pause, suspenders, resume after a crash); a
:class:`StageActions` implementation decides *how* (SSH to the DGX, deploy to the Pis, lm-eval against
the API, energy from the ledger). :class:`epiconsole.engine.lab.LabActions` drives the real (or
simulated) lab; unit tests drive the state machine with a fast fake.

Every method returns a JSON-able dict that the engine stores with the stage's checkpoint or result.
A lab-side failure (a host refusing, a command failing, the API erroring past its retries) raises
:class:`StageError` with one sentence saying what went wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from epiconsole.matrix import Configuration

#: Called with 0..1 (or None when unknown) and an optional short message.
Progress = Callable[[float | None, str], None]


class StageError(Exception):
    """A stage failed for a lab reason; the message is one sentence for the log and the report."""


@dataclass(frozen=True)
class Window:
    """A measurement window in host time, with the repetition it belongs to."""

    trial_id: int
    config_id: str
    rep: int
    t0: float
    t1: float


class StageActions(Protocol):
    async def prepare(self) -> dict[str, Any]:
        """Once per engine session before the first stage: connect, set governors; returns provenance."""
        ...

    async def surgery(self, config: Configuration, progress: Progress) -> dict[str, Any]: ...

    async def validate(self, config: Configuration, progress: Progress) -> dict[str, Any]: ...

    async def convert(self, config: Configuration, progress: Progress) -> dict[str, Any]: ...

    async def deploy(self, config: Configuration, progress: Progress) -> dict[str, Any]:
        """Copy, verify, restart workers and root, wait for the API; returns model name, size and hash."""
        ...

    async def deployed(self, config: Configuration, deploy: dict[str, Any] | None) -> bool:
        """Whether the cluster serves ``config`` right now (after a restart the engine checks before measuring)."""
        ...

    async def stabilize(self, config: Configuration, progress: Progress) -> dict[str, Any]:
        """Wait the minimum time AND until every node's power spread is under the threshold."""
        ...

    def window_begin(self, t0: float) -> None:
        """The measurement window opened at host time ``t0`` (for live window energy)."""
        ...

    async def benchmark(self, config: Configuration, progress: Progress) -> dict[str, Any]:
        """Run the suite; the result carries tokens, per-task accuracy, composite and provenance."""
        ...

    async def window_end(self, t1: float) -> None:
        """The window closed at ``t1``; returns once the ingest has committed samples past ``t1``."""
        ...

    async def calculate(self, window: Window, bench: dict[str, Any]) -> dict[str, Any]:
        """Energy over the window, J/token, EPI and the validity verdict (``validity.valid/reasons``)."""
        ...

    async def trial_provenance(self, config: Configuration) -> dict[str, Any]:
        """What this repetition ran on (node kernels, dllama version, meter info)."""
        ...

    def conditions(self) -> dict[str, str]:
        """Suspender conditions that are bad right now: name -> detail (empty when all is well)."""
        ...
